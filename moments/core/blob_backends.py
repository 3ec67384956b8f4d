"""Pick the blob store the settings name (its own module: the S3 store imports the interface)."""

from __future__ import annotations

from moments.core.blobs import BlobStore, LocalBlobStore

BACKENDS = ("local", "s3")


def open_blob_store(settings) -> BlobStore:
    """A local directory under ``data_dir``, or an S3 bucket (boto3 is imported only then)."""
    if settings.blob_backend == "local":
        return LocalBlobStore(settings.blob_dir, settings.upload_dir)
    if settings.blob_backend == "s3":
        from moments.core.s3_blobs import S3BlobStore

        return S3BlobStore.from_settings(settings)
    raise ValueError(f"blob_backend {settings.blob_backend!r} is not one of {', '.join(BACKENDS)}")
