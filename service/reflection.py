"""Server reflection, ``grpc.reflection.v1`` and ``v1alpha``, serving the API with its comments.

grpcio-reflection implements only v1alpha, and serves descriptors from a protobuf pool, which keeps
no source info, so a client such as grpcurl would see no comments. Here its servicer gets a
:class:`DescriptorSource` instead of a pool: the descriptor set that ``moments.tools.protogen``
generates with source info (``moments/v1/moments.binpb``) first, the default pool (health,
reflection) for everything else. v1 has the same messages as v1alpha under another package, so one
servicer answers both; v1's descriptor is v1alpha's with the package renamed.
"""

from __future__ import annotations

from importlib import resources

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

V1 = "grpc.reflection.v1.ServerReflection"
V1ALPHA = reflection.SERVICE_NAME


class _File:
    """A file of the descriptor set, shaped like the FileDescriptor the reflection servicer walks."""

    def __init__(self, proto: descriptor_pb2.FileDescriptorProto, source: "DescriptorSource") -> None:
        self.proto = proto
        self.name = proto.name
        self._source = source

    @property
    def dependencies(self) -> list:
        return [self._source.FindFileByName(name) for name in self.proto.dependency]

    def CopyToProto(self, proto: descriptor_pb2.FileDescriptorProto) -> None:  # noqa: N802 - pool API
        proto.CopyFrom(self.proto)


class DescriptorSource:
    """The part of ``DescriptorPool``'s interface reflection uses, over files with source info."""

    def __init__(self, files: list[descriptor_pb2.FileDescriptorProto],
                 fallback: descriptor_pool.DescriptorPool) -> None:
        self.fallback = fallback
        self.files = {f.name: _File(f, self) for f in files}
        self.symbols: dict[str, str] = {}
        for f in files:
            prefix = f"{f.package}." if f.package else ""
            for message in f.message_type:
                self._index_message(prefix, message, f.name)
            for enum in f.enum_type:
                self._index_enum(prefix, enum, f.name)
            for service in f.service:
                self.symbols[prefix + service.name] = f.name
                for method in service.method:
                    self.symbols[f"{prefix}{service.name}.{method.name}"] = f.name

    def _index_message(self, prefix: str, message, file_name: str) -> None:
        name = prefix + message.name
        self.symbols[name] = file_name
        for field in message.field:
            self.symbols[f"{name}.{field.name}"] = file_name
        for nested in message.nested_type:
            self._index_message(name + ".", nested, file_name)
        for enum in message.enum_type:
            self._index_enum(name + ".", enum, file_name)

    def _index_enum(self, prefix: str, enum, file_name: str) -> None:
        self.symbols[prefix + enum.name] = file_name
        for value in enum.value:  # enum values are siblings of their enum in protobuf's scoping
            self.symbols[prefix + value.name] = file_name

    def FindFileByName(self, name: str):  # noqa: N802 - pool API
        return self.files[name] if name in self.files else self.fallback.FindFileByName(name)

    def FindFileContainingSymbol(self, symbol: str):  # noqa: N802 - pool API
        if symbol in self.symbols:
            return self.files[self.symbols[symbol]]
        return self.fallback.FindFileContainingSymbol(symbol)

    def FindMessageTypeByName(self, name: str):  # noqa: N802 - pool API (extensions: none here)
        return self.fallback.FindMessageTypeByName(name)

    def FindExtensionByNumber(self, message, number: int):  # noqa: N802 - pool API
        return self.fallback.FindExtensionByNumber(message, number)

    def FindAllExtensions(self, message):  # noqa: N802 - pool API
        return self.fallback.FindAllExtensions(message)


def api_files() -> list[descriptor_pb2.FileDescriptorProto]:
    """The API's files with comments: the generated descriptor set, imports included."""
    raw = resources.files("moments.v1").joinpath("moments.binpb").read_bytes()
    return list(descriptor_pb2.FileDescriptorSet.FromString(raw).file)


def v1_reflection_file() -> descriptor_pb2.FileDescriptorProto:
    """``grpc/reflection/v1/reflection.proto``: v1alpha's messages and service, package renamed."""
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    old, new = proto.package, "grpc.reflection.v1"
    proto.name, proto.package = "grpc/reflection/v1/reflection.proto", new
    proto.ClearField("options")
    for message in proto.message_type:
        for field in message.field:
            if field.type_name.startswith(f".{old}."):
                field.type_name = f".{new}." + field.type_name[len(old) + 2:]
    for service in proto.service:
        for method in service.method:
            method.input_type = f".{new}." + method.input_type[len(old) + 2:]
            method.output_type = f".{new}." + method.output_type[len(old) + 2:]
    return proto


def enable_reflection(server: grpc.aio.Server, service_names: tuple[str, ...]) -> None:
    """Serve reflection v1 and v1alpha for ``service_names`` (both reflection services added)."""
    source = DescriptorSource([*api_files(), v1_reflection_file()], descriptor_pool.Default())
    names = (*service_names, V1, V1ALPHA)
    servicer = reflection.aio.ReflectionServicer(names, pool=source)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(V1, {
        "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
        ),
    }),))
