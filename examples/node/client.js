#!/usr/bin/env node
// A Moments client in Node, built from protos/ alone (no generated code): uploads a video and
// resumes the upload after cutting its first stream short, asks with Localize and StreamLocalize,
// and decodes the google.rpc error details the server sends (BadRequest, ErrorInfo, RetryInfo).
//
//   cd examples/node && npm ci
//   node client.js [--target 127.0.0.1:50051] [--api-key KEY] [--cut-after BYTES] [--burst N] \
//       VIDEO "a red circle appears" ["another query" ...]
//
// It prints one JSON object per line, {"step": ...}, and exits 0 when every step went as the API
// says. MOMENTS_TARGET and MOMENTS_API_KEY work as for the Python CLI.
'use strict';

const crypto = require('node:crypto');
const fs = require('node:fs');
const path = require('node:path');
const { once } = require('node:events');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

const PROTOS = path.resolve(__dirname, '..', '..', 'protos');
// moments.proto imports only well-known types (Duration, Timestamp), which proto-loader ships; the
// google.rpc error details live in protos/third_party.
const INCLUDE_DIRS = [PROTOS, path.join(PROTOS, 'third_party')];
const CHUNK_BYTES = 1024 * 1024; // the API's largest chunk

// How messages map to JavaScript objects, for the API and for the error details alike:
//   keepCase: false  field names in lowerCamelCase (videoId, startOffset), as in proto3 JSON.
//   longs: Number    int64 fields as plain numbers. Exact for this API: its int64s are byte sizes
//                    and offsets (at most 8 GiB), counts and Duration.seconds, all far below
//                    Number.MAX_SAFE_INTEGER (2^53 - 1). (Without it they arrive as Long objects;
//                    with longs: String as decimal strings: use String plus BigInt where values can
//                    pass 2^53.) Requests accept numbers, strings or Longs for int64 fields.
//   enums: String    enum values by name ("CACHE_HIT_KV", "DECODING"), not by number.
//   defaults: true   unset fields read as their defaults (found: false, segments: []), as in proto3.
//   oneofs: true     a virtual field names the member of a oneof that is set: JobEvent.event is
//                    "progress", "result" or "done".
// google.protobuf.Duration and Timestamp stay objects {seconds, nanos} (proto-loader has no JSON
// mapping for them): see seconds() and duration() below.
const LOADER_OPTIONS = { keepCase: false, longs: Number, enums: String, defaults: true, oneofs: true };

function loadApi() {
  const definition = protoLoader.loadSync('moments/v1/moments.proto',
    { ...LOADER_OPTIONS, includeDirs: INCLUDE_DIRS });
  return grpc.loadPackageDefinition(definition).moments.v1;
}

// The details of an error come as a google.rpc.Status in the binary trailer
// grpc-status-details-bin; its details are google.protobuf.Any. proto-loader makes service
// clients, not decoders, so protobufjs (which proto-loader is built on) decodes them.
function loadErrorTypes() {
  const root = new protobuf.Root();
  root.resolvePath = (origin, target) => {
    for (const dir of INCLUDE_DIRS) {
      const candidate = path.join(dir, target);
      if (fs.existsSync(candidate)) return candidate;
    }
    return target; // google/protobuf/*.proto: protobufjs has them built in
  };
  root.loadSync(['google/rpc/status.proto', 'google/rpc/error_details.proto'], { keepCase: false });
  return root;
}

const ERROR_TYPES = loadErrorTypes();
const STATUS = ERROR_TYPES.lookupType('google.rpc.Status');
const OBJECT_OPTIONS = { longs: Number, enums: String, defaults: true };

/** A gRPC error as {code, message, details: [{type, ...fields}]}, details decoded from the trailer. */
function decodeError(err) {
  const code = Object.keys(grpc.status).find((name) => grpc.status[name] === err.code) || String(err.code);
  const [raw] = err.metadata ? err.metadata.get('grpc-status-details-bin') : [];
  const details = [];
  if (raw) {
    for (const any of STATUS.decode(raw).details) {
      const typeUrl = any.type_url || any.typeUrl; // protobufjs' built-in Any keeps the proto names
      const type = typeUrl.slice(typeUrl.lastIndexOf('/') + 1); // type.googleapis.com/google.rpc.ErrorInfo
      const message = ERROR_TYPES.lookupType(type);
      details.push({ type, ...message.toObject(message.decode(any.value), OBJECT_OPTIONS) });
    }
  }
  return { code, message: err.details, details };
}

const detail = (error, type) => error.details.find((d) => d.type === `google.rpc.${type}`);
const seconds = (d) => (d ? Number(d.seconds) + d.nanos / 1e9 : 0);
const duration = (s) => ({ seconds: Math.floor(s), nanos: Math.round((s - Math.floor(s)) * 1e9) });
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const print = (step, fields) => console.log(JSON.stringify({ step, ...fields }));

class Moments {
  constructor(api, target, apiKey) {
    // TLS: grpc.credentials.createSsl(fs.readFileSync('ca.pem')) instead of createInsecure().
    this.stub = new api.Moments(target, grpc.credentials.createInsecure());
    this.apiKey = apiKey;
  }

  metadata() {
    const metadata = new grpc.Metadata();
    if (this.apiKey) metadata.set('authorization', `Bearer ${this.apiKey}`);
    return metadata;
  }

  options(timeoutS) {
    return { deadline: Date.now() + timeoutS * 1000 };
  }

  unary(method, request, timeoutS = 60) {
    return new Promise((resolve, reject) => {
      this.stub[method](request, this.metadata(), this.options(timeoutS),
        (err, reply) => (err ? reject(err) : resolve(reply)));
    });
  }

  /** Call ``fn`` again after RESOURCE_EXHAUSTED (waiting RetryInfo.retry_delay) or UNAVAILABLE. */
  async withRetry(fn, attempts = 5) {
    for (let attempt = 1; ; attempt++) {
      try {
        return await fn();
      } catch (err) {
        const error = decodeError(err);
        if (attempt >= attempts || !['RESOURCE_EXHAUSTED', 'UNAVAILABLE'].includes(error.code)) throw err;
        const retry = detail(error, 'RetryInfo');
        const delayS = retry ? seconds(retry.retryDelay) : Math.min(0.5 * 2 ** attempt, 5);
        print('retry', { error, delay_s: delayS });
        await sleep(delayS * 1000);
      }
    }
  }

  /**
   * Upload ``file``, resuming after a cut stream: the id comes from the error's ErrorInfo, the
   * committed offset from GetUpload, and the next stream starts there. ``cutAfterBytes`` ends the
   * first stream early on purpose (0: never).
   */
  async upload(file, cutAfterBytes = 0) {
    const { size } = fs.statSync(file);
    const sha256 = crypto.createHash('sha256').update(fs.readFileSync(file)).digest('hex');
    let uploadId = '';
    let offset = 0;
    let stopAt = cutAfterBytes > 0 ? Math.min(cutAfterBytes, size) : size;
    for (let attempt = 1; attempt <= 6; attempt++) {
      if (uploadId) {
        const upload = await this.withRetry(() => this.unary('getUpload', { uploadId }));
        offset = upload.committedBytes;
        print('get_upload', { upload_id: upload.uploadId, committed_bytes: offset, size_bytes: upload.sizeBytes,
          expire_time_s: upload.expireTime.seconds });
      }
      const header = uploadId ? { uploadId }
        : { sizeBytes: size, sha256, filename: path.basename(file), contentType: 'video/mp4' };
      try {
        const reply = await this.sendUpload(file, header, offset, stopAt);
        print('uploaded', { video_id: reply.video.videoId, deduplicated: reply.deduplicated, upload_id: reply.uploadId,
          resumed_at: offset, duration_s: seconds(reply.video.duration), size_bytes: reply.video.sizeBytes });
        return reply.video;
      } catch (err) {
        const error = decodeError(err);
        print('upload_interrupted', { error });
        const info = detail(error, 'ErrorInfo');
        if (info && info.metadata.upload_id) uploadId = info.metadata.upload_id;
        if (error.code === 'RESOURCE_EXHAUSTED') {
          await sleep(seconds(detail(error, 'RetryInfo')?.retryDelay) * 1000 || 1000);
        } else if (info?.reason === 'UPLOAD_BUSY' || ['UNAVAILABLE', 'CANCELLED'].includes(error.code)) {
          await sleep(200 * 2 ** attempt); // another stream (say, our cut one) still holds the upload
        } else if (info?.reason !== 'WRONG_OFFSET') {
          throw err; // INVALID_ARGUMENT and the like: resending the same bytes cannot help
        }
        stopAt = size;
      }
    }
    throw new Error('upload did not finish');
  }

  /** One UploadVideo stream: the header, then the file's bytes [offset, stopAt) in chunks. */
  sendUpload(file, header, offset, stopAt) {
    return new Promise((resolve, reject) => {
      let answered = false;
      const call = this.stub.uploadVideo(this.metadata(), this.options(600), (err, reply) => {
        answered = true;
        if (err) reject(err); else resolve(reply);
      });
      (async () => {
        call.write({ header });
        const fd = fs.openSync(file, 'r');
        try {
          const buffer = Buffer.alloc(CHUNK_BYTES);
          for (let position = offset; position < stopAt && !answered;) {
            const n = fs.readSync(fd, buffer, 0, Math.min(CHUNK_BYTES, stopAt - position), position);
            // The chunk carries its offset: the server refuses any other than its committed one.
            if (!call.write({ chunk: { offset: position, data: Buffer.from(buffer.subarray(0, n)) } })) {
              await once(call, 'drain');
            }
            position += n;
          }
        } finally {
          fs.closeSync(fd);
        }
        call.end(); // before size_bytes when cut short: the server answers WRONG_OFFSET
      })().catch((err) => { call.cancel(); reject(err); });
    });
  }

  async localize(videoId, queries) {
    const answer = await this.withRetry(() => this.unary('localize', { videoId, queries }, 300));
    return {
      job_id: answer.jobId,
      results: answer.results.map(queryResult),
      stats: { cache: answer.stats.cache, frames: answer.stats.frames, sampled_fps: answer.stats.sampledFps,
        stage_ms: answer.stats.stageMs },
    };
  }

  /** StreamLocalize: progress per stage, each result as soon as it is ready, ``done`` last; retried as unary calls are. */
  async streamLocalize(videoId, queries, onEvent) {
    // A quota refusal comes before the first event, so calling again repeats nothing.
    await this.withRetry(async () => {
      const call = this.stub.streamLocalize({ videoId, queries }, this.metadata(), this.options(300));
      for await (const event of call) onEvent(event);
    });
  }
}

function queryResult(r) {
  return {
    query_index: r.queryIndex, query: r.query, found: r.found, raw_answer: r.rawAnswer,
    segments: r.segments.map((s) => ({ start_s: seconds(s.startOffset), end_s: seconds(s.endOffset),
      confidence: s.confidence })),
  };
}

function parseArgs(argv) {
  const args = { target: process.env.MOMENTS_TARGET || '127.0.0.1:50051', apiKey: process.env.MOMENTS_API_KEY || '',
    cutAfter: 0, burst: 0, positional: [] };
  for (let i = 0; i < argv.length; i++) {
    const flag = { '--target': 'target', '--api-key': 'apiKey', '--cut-after': 'cutAfter', '--burst': 'burst' }[argv[i]];
    if (flag) args[flag] = ['cutAfter', 'burst'].includes(flag) ? Number(argv[++i]) : argv[++i];
    else args.positional.push(argv[i]);
  }
  if (args.positional.length < 2) {
    console.error('usage: node client.js [--target HOST:PORT] [--api-key KEY] [--cut-after BYTES] [--burst N] VIDEO QUERY...');
    process.exit(2);
  }
  return args;
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const [file, ...queries] = args.positional;
  const client = new Moments(loadApi(), args.target, args.apiKey);

  const video = await client.upload(file, args.cutAfter);
  print('localize', await client.localize(video.videoId, queries));

  const stages = [];
  await client.streamLocalize(video.videoId, queries, (event) => {
    if (event.event === 'progress') stages.push(event.progress.stage);
    else if (event.event === 'result') print('stream_result', queryResult(event.result));
    else print('stream_done', { stages: [...new Set(stages)], cache: event.done.cache, job_id: event.jobId });
  });

  // Errors with details: a blank query (INVALID_ARGUMENT + BadRequest naming the field) ...
  try {
    await client.withRetry(() => client.unary('localize', { videoId: video.videoId, queries: [' '] }));
    throw new Error('a blank query was accepted');
  } catch (err) {
    if (!err.metadata) throw err;
    print('bad_request', { error: decodeError(err) });
  }
  // ... a sampling range given as a Duration object, past the video's end ...
  try {
    await client.withRetry(() => client.unary('localize', { videoId: video.videoId, queries: queries.slice(0, 1),
      sampling: { startOffset: duration(seconds(video.duration) + 1.5) } }));
    throw new Error('a range past the end was accepted');
  } catch (err) {
    if (!err.metadata) throw err;
    print('bad_range', { error: decodeError(err) });
  }
  // ... and, under a rate quota, RESOURCE_EXHAUSTED + RetryInfo, honoured by withRetry.
  if (args.burst > 0) {
    const replies = await Promise.all(Array.from({ length: args.burst },
      () => client.withRetry(() => client.unary('getVideo', { videoId: video.videoId }))));
    print('burst', { calls: replies.length, all_found: replies.every((v) => v.videoId === video.videoId) });
  }
  print('finished', {});
}

main().catch((err) => {
  print('failed', { error: err.metadata ? decodeError(err) : { message: String(err.stack || err) } });
  process.exit(1);
});
