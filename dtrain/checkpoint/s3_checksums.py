"""The checksums an S3 store keeps of its objects, and handing it dtrain's own.

S3 checks an upload's body against a checksum sent with PutObject (CRC32C, CRC64NVME, SHA-256) and refuses a
corrupted one; it keeps the value, and HeadObject with checksum mode returns it, so a checkpoint in S3 verifies
without downloading a byte where the manifest uses one of those algorithms. Other stores, and S3-compatible ones
that do not support checksums (older MinIO, Ceph: `AWS_REQUEST_CHECKSUM_CALCULATION=when_required`, which
botocore reads too), get none and are verified by reading the objects.
"""

from __future__ import annotations

import base64
import os

# The checksums S3 keeps natively, and the PutObject/HeadObject field of each (base64 of the big-endian bytes).
S3_CHECKSUM_FIELDS = {"crc32c": "ChecksumCRC32C", "crc64nvme": "ChecksumCRC64NVME", "sha256": "ChecksumSHA256"}


def is_s3(fs) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "s3" in protocols


def checksums_only_when_required() -> bool:
    """botocore's switch for S3-compatible stores without checksum support."""
    return os.environ.get("AWS_REQUEST_CHECKSUM_CALCULATION", "").lower() == "when_required"


def checksum_for_store(fs, algorithm: str, value: str) -> dict[str, str]:
    """PutObject's checksum arguments for an S3 store that keeps this algorithm (hex `value`); none elsewhere."""
    if not is_s3(fs) or algorithm not in S3_CHECKSUM_FIELDS or checksums_only_when_required():
        return {}
    return {"ChecksumAlgorithm": algorithm.upper(),
            S3_CHECKSUM_FIELDS[algorithm]: base64.b64encode(bytes.fromhex(value)).decode()}


def stored_checksum(fs, path: str, algorithm: str) -> str | None:
    """The whole-object checksum an S3 store keeps for the object at `path` in `algorithm` (lowercase hex), read
    with HeadObject; None where it keeps none in that algorithm (another algorithm, the per-part checksum of a
    multipart upload, a store that is not S3, a store that cannot say)."""
    if not is_s3(fs) or algorithm not in S3_CHECKSUM_FIELDS:
        return None
    bucket, key, _ = fs.split_path(path)
    try:
        head = fs.call_s3("head_object", Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    except Exception:  # noqa: BLE001 - the store cannot say: read the object instead
        return None
    value = head.get(S3_CHECKSUM_FIELDS[algorithm])
    if not value or head.get("ChecksumType") == "COMPOSITE" or "-" in value:
        return None
    return base64.b64decode(value).hex()
