// A small command line around tus-js-client 4.x under Node, driven by tests/test_tus_clients.py.
//
//   node upload.mjs '<json config>'      (or the JSON on stdin when no argument is given)
//
// Config (every key optional except `file` and one of `endpoint` / `uploadUrl`):
//   endpoint, uploadUrl        creation URL / an upload URL to resume from
//   file                       path of the file to send
//   input                      "file" (fs.createReadStream, the default), "buffer" (the file read into
//                              a Buffer) or "stream" (a plain Readable: no size, no fingerprint)
//   token                      DRF token, sent as `Authorization: Token <token>`
//   headers                    more request headers
//   chunkSize                  bytes per PATCH; null or absent means one PATCH (Infinity)
//   parallelUploads, uploadLengthDeferred, uploadDataDuringCreation, overridePatchMethod,
//   metadata, retryDelays, removeFingerprintOnSuccess, uploadSize   passed to tus.Upload as is
//   urlStorage                 path of a JSON file for tus.FileUrlStorage; with `resume: true` the
//                              run looks up the previous upload of this file and resumes it
//   abortAfterBytes, abortOn   call upload.abort() (no termination) once `abortAfterBytes` were
//                              reported by onProgress ("progress": mid-request, the default) or
//                              accepted by the server (onChunkComplete: "chunk", between requests)
//   paceBytesPerSecond         send request bodies no faster than this (a slow link), so that an
//                              abort on progress lands in the middle of a request
//
// Output: one JSON object per line on stdout: request, response, progress, chunk, url, resume,
// then exactly one of success, aborted or error. Exit status 0 for success or aborted, 1 for error.
import fs from 'node:fs'
import { PassThrough, Readable } from 'node:stream'
import { setTimeout as sleep } from 'node:timers/promises'

import tus from 'tus-js-client'

const { Upload, FileUrlStorage, DefaultHttpStack } = tus
const TIMEOUT_MS = 60_000
const PACE_TICK_MS = 5

let finished = false

function emit(event, fields = {}) {
  process.stdout.write(`${JSON.stringify({ event, ...fields })}\n`)
}

function finish(event, fields, code) {
  finished = true
  emit(event, fields)
  process.exit(code)
}

// Node exits by itself when nothing is pending, e.g. when tus-js-client waits on a stream that
// already ended (tus-js-client#779): report that as an error rather than as silence.
process.on('exit', (code) => {
  if (!finished) {
    emit('error', { message: 'tus-js-client stopped without reporting success or an error' })
    process.exitCode = code || 1
  }
})

// The default Node HTTP stack, with request bodies paced to `bytesPerSecond`.
class PacedHttpStack {
  constructor(bytesPerSecond) {
    this._inner = new DefaultHttpStack()
    this._tickBytes = Math.max(1, Math.round((bytesPerSecond * PACE_TICK_MS) / 1000))
  }

  createRequest(method, url) {
    const req = this._inner.createRequest(method, url)
    const send = req.send.bind(req)
    req.send = (body = null) => send(body?.size ? this._paced(body) : body)
    return req
  }

  _paced(body) {
    const tickBytes = this._tickBytes
    async function* slowly() {
      const chunks = Buffer.isBuffer(body) || body instanceof Uint8Array ? [body] : body
      for await (const chunk of chunks) {
        for (let start = 0; start < chunk.length; start += tickBytes) {
          yield chunk.subarray(start, start + tickBytes)
          await sleep(PACE_TICK_MS)
        }
      }
    }
    const paced = Readable.from(slowly(), { objectMode: false })
    paced.size = body.size // the stack sets Content-Length from it
    return paced
  }

  getName() {
    return 'PacedHttpStack'
  }
}

async function readConfig() {
  if (process.argv[2]) return JSON.parse(process.argv[2])
  const chunks = []
  for await (const chunk of process.stdin) chunks.push(chunk)
  return JSON.parse(Buffer.concat(chunks).toString('utf8'))
}

function openInput(config) {
  const kind = config.input ?? 'file'
  if (kind === 'file') return fs.createReadStream(config.file)
  if (kind === 'buffer') return fs.readFileSync(config.file)
  if (kind === 'stream') {
    // Not an fs.ReadStream, so tus-js-client cannot stat it: a stream of unknown length.
    return fs.createReadStream(config.file).pipe(new PassThrough())
  }
  throw new Error(`unknown input kind ${kind}`)
}

const TRACED_HEADERS = [
  'Upload-Offset',
  'Upload-Length',
  'Upload-Defer-Length',
  'Upload-Concat',
  'Upload-Metadata',
  'X-HTTP-Method-Override',
  'Content-Type',
]

function traceRequest(req) {
  const headers = {}
  for (const name of TRACED_HEADERS) {
    const value = req.getHeader(name)
    if (value !== undefined) headers[name] = String(value)
  }
  return { method: req.getMethod(), url: req.getURL(), headers }
}

async function main() {
  const config = await readConfig()
  const input = openInput(config)

  const headers = { ...(config.headers ?? {}) }
  if (config.token) headers.Authorization = `Token ${config.token}`

  let upload = null
  let aborting = false
  const abortAfter = config.abortAfterBytes ?? null
  const abortOn = config.abortOn ?? 'progress'

  const abortNow = (bytes) => {
    if (aborting) return
    aborting = true
    // abort() without `true`: stop sending, leave the upload on the server (a lost connection).
    upload.abort(false).then(
      () => finish('aborted', { url: upload.url, bytes, parallelUploadUrls: upload._parallelUploadUrls }, 0),
      (err) => finish('error', { message: String(err) }, 1),
    )
  }

  const options = {
    endpoint: config.endpoint ?? null,
    uploadUrl: config.uploadUrl ?? null,
    headers,
    metadata: config.metadata ?? {},
    chunkSize: config.chunkSize ?? Number.POSITIVE_INFINITY,
    parallelUploads: config.parallelUploads ?? 1,
    uploadLengthDeferred: Boolean(config.uploadLengthDeferred),
    uploadDataDuringCreation: Boolean(config.uploadDataDuringCreation),
    overridePatchMethod: Boolean(config.overridePatchMethod),
    removeFingerprintOnSuccess: Boolean(config.removeFingerprintOnSuccess),
    retryDelays: config.retryDelays === undefined ? [0, 250, 500, 1000] : config.retryDelays,
    onBeforeRequest: (req) => emit('request', traceRequest(req)),
    onAfterResponse: (req, res) => {
      const offset = res.getHeader('Upload-Offset')
      emit('response', {
        ...traceRequest(req),
        status: res.getStatus(),
        offset: offset === undefined ? null : Number(offset),
        location: res.getHeader('Location') ?? null,
        body: res.getStatus() >= 400 ? res.getBody().slice(0, 2000) : undefined,
      })
    },
    onProgress: (bytesSent, bytesTotal) => {
      emit('progress', { bytesSent, bytesTotal })
      if (abortAfter !== null && abortOn === 'progress' && bytesSent >= abortAfter) abortNow(bytesSent)
    },
    onChunkComplete: (chunkSize, bytesAccepted, bytesTotal) => {
      emit('chunk', { chunkSize, bytesAccepted, bytesTotal })
      if (abortAfter !== null && abortOn === 'chunk' && bytesAccepted >= abortAfter) abortNow(bytesAccepted)
    },
    onUploadUrlAvailable: () => emit('url', { url: upload.url }),
    onSuccess: () => finish('success', { url: upload.url }, 0),
    onError: (err) => {
      const res = err.originalResponse
      finish(
        'error',
        {
          message: String(err.message ?? err),
          status: res ? res.getStatus() : null,
          body: res ? res.getBody().slice(0, 2000) : null,
        },
        1,
      )
    },
  }
  if (config.uploadSize != null) options.uploadSize = config.uploadSize
  if (config.paceBytesPerSecond) options.httpStack = new PacedHttpStack(config.paceBytesPerSecond)
  if (config.urlStorage) options.urlStorage = new FileUrlStorage(config.urlStorage)

  upload = new Upload(input, options)

  if (config.resume) {
    const previous = await upload.findPreviousUploads()
    emit('resume', { found: previous.length, uploadUrl: previous[0]?.uploadUrl ?? null })
    if (previous.length > 0) upload.resumeFromPreviousUpload(previous[0])
  }
  upload.start()
}

setTimeout(() => finish('error', { message: `no result after ${TIMEOUT_MS} ms` }, 1), TIMEOUT_MS).unref()
main().catch((err) => finish('error', { message: String(err?.stack ?? err) }, 1))
