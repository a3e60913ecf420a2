"""Every way an upload request can fail, each carrying its HTTP status.

The engine raises these; each front end (REST, tus, page) renders them in its own dialect. `extra()`
holds machine-readable facts a client needs to recover, e.g. the offset after a 409.
"""
from __future__ import annotations

from typing import Any


class UploadError(Exception):
    status_code = 400
    default_detail = "The upload request is invalid."
    default_code = "invalid"

    def __init__(self, detail: str | None = None, **extra: Any) -> None:
        self.detail = detail or self.default_detail
        self.code = self.default_code
        self._extra = extra
        super().__init__(self.detail)

    def extra(self) -> dict[str, Any]:
        return dict(self._extra)


class InvalidRequest(UploadError):
    """Malformed input: a header, a number, a file name."""


class OffsetMismatch(UploadError):
    # tus 1.0.0 and our REST API: a chunk that does not start at the stored offset is refused whole.
    status_code = 409
    default_detail = "The chunk does not start at the upload's current offset."
    default_code = "offset_mismatch"


class UploadReleased(UploadError):
    # A newer request for the same upload (a client resuming after its connection died) asked
    # this one to stop; it committed what it had. Retryable: the client asks for the offset again.
    status_code = 409
    default_detail = "A newer request for this upload took over."
    default_code = "released"


class FinalNotWritable(UploadError):
    # tus concatenation: a final upload is made of its parts, never appended to (TUS.md K7).
    status_code = 403
    default_detail = "This upload is the concatenation of partial uploads; it cannot be appended to."
    default_code = "final_upload"


class UnsupportedVersion(UploadError):
    # tus: a request for a protocol version this server does not speak changes nothing (TUS.md A2).
    status_code = 412
    default_detail = "This server speaks tus 1.0.0 only (send 'Tus-Resumable: 1.0.0')."
    default_code = "unsupported_version"


class UploadConflict(UploadError):
    status_code = 409
    default_detail = "An unfinished upload of this file conflicts with the request."
    default_code = "conflict"


class UploadNotFound(UploadError):
    status_code = 404
    default_detail = "No such upload."
    default_code = "not_found"


class UploadGone(UploadError):
    status_code = 410
    default_detail = "The upload has expired or failed; start a new one."
    default_code = "gone"


class DataLost(UploadError):
    # The disk holds fewer bytes than were acknowledged (lost without fsync, or deleted by hand).
    # Rewinding the offset would contradict an earlier ack (IETF: offsets never decrease), and
    # zero-filling would publish wrong bytes: the upload is failed and must start again.
    status_code = 410
    default_detail = "Part of this upload's stored data was lost; start a new upload."
    default_code = "data_lost"


class UploadComplete(UploadError):
    status_code = 409
    default_detail = "The upload is already complete."
    default_code = "complete"


class NotComplete(UploadError):
    status_code = 409
    default_detail = "The upload is not complete yet."
    default_code = "not_complete"


class LengthRequired(UploadError):
    # Django reads a chunked body without Content-Length as empty (ticket 35838): refuse, never ack 0.
    status_code = 411
    default_detail = "Content-Length is required."
    default_code = "length_required"


class TooLarge(UploadError):
    status_code = 413
    default_detail = "Too large."
    default_code = "too_large"


class QuotaExceeded(TooLarge):
    default_detail = "Your unfinished uploads already claim too many bytes; finish or cancel some first."
    default_code = "quota_exceeded"


class UnsupportedMediaType(UploadError):
    status_code = 415
    default_detail = "Chunks must be sent as application/octet-stream."
    default_code = "unsupported_media_type"


class ChecksumMismatch(UploadError):
    status_code = 422
    default_detail = "The data does not match the checksum."
    default_code = "checksum_mismatch"


class IncompleteBody(UploadError):
    status_code = 400
    default_detail = "The request body ended before Content-Length bytes arrived."
    default_code = "incomplete_body"


class UploadBusy(UploadError):
    # Retryable on purpose: tus clients and our page retry 423 (TUS.md N2), never a 400.
    status_code = 423
    default_detail = "Another request is writing to this upload; retry shortly."
    default_code = "busy"


class TooManyUploads(UploadError):
    status_code = 429
    default_detail = "Too many unfinished uploads; finish or cancel some first."
    default_code = "too_many_uploads"


class StorageFull(UploadError):
    status_code = 507
    default_detail = "The server has no space left for this data; retry later."
    default_code = "storage_full"


class StorageFailure(UploadError):
    status_code = 503
    default_detail = "The data could not be stored; retry later."
    default_code = "storage_failure"
