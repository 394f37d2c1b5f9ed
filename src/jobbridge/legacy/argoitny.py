"""argoitny (codeforces_jobhelper) job records: single-table ``algoitny_main`` items <-> canonical Jobs.

Layout, as argoitny's repositories write it (boto3 resource API, so numbers read back as Decimal)::

    PK 'SGJOB#{id}' | 'PEJOB#{id}'   SK 'META'   tp 'sgjob' | 'pejob'
    dat  {plt, pid, tit, url, tag, lng, con, gen, sts, tid, err, mdl}   (PEJOB: plt, pid, url, pidt, tit, ...)
    crt, upd  epoch seconds            GSI1PK '{SGJOB|PEJOB}#STATUS#{sts}'   GSI1SK '{crt:020d}#{id}'
    GSI2PK 'SGJOB#{plt}#{pid}'  GSI2SK '{crt:020d}#{id}'   (script generation only; KEYS_ONLY)
    progress history: PK 'JOB#{generation|extraction}#{id}'  SK 'PROG#{epoch}'  dat {stp, msg, sts}  crt

Mapping decisions:

* **type**: SGJOB -> ``script_generation``, PEJOB -> ``problem_extraction`` (argoitny's model names); the
  progress items call them ``generation``/``extraction``.
* **ids**: the id after the PK prefix is the legacy id (UUIDs, or integers from the PostgreSQL migration such
  as ``PEJOB#42``); the Job id is :func:`job_id_for` of it.
* **parameters**: the ``dat`` fields under their long names (``plt`` -> ``platform``, ``tag`` -> ``tags``,
  ``mdl`` -> ``model`` ...). Empty strings and lists are argoitny's "not set" and are left out; encode writes
  them back as ``''``/``[]``. ``mdl`` is written only when a model is given.
* **result**: ``{'generator_code': ...}`` from ``dat.gen``, which is base64 (readers decode it; text that is
  not base64 is taken as it is, as argoitny's own reader does). Encode always writes base64.
* **error** = ``dat.err`` ('' -> None); ``dat.tid`` (the Celery task id) is legacy-only, in ``extra``.
* **timestamps**: ``crt`` -> created_at; ``upd`` -> finished_at for COMPLETED/FAILED (the last write of a
  finished job is its transition). Epoch numbers are UTC by definition; ISO strings (naive = UTC) are read
  too. Encode keeps ``upd`` at least the latest job timestamp: argoitny's orphan recovery fails PROCESSING
  jobs whose ``upd`` is over 10 minutes old, so a mirror should pass the write time in ``extra['upd']``.
* **GSI keys** are always written from the status and ``crt``, so a migrated item without GSI1 (``PEJOB#42``)
  becomes listable by status once re-encoded.
* canonical fields the layout has no place for (priority, progress, tags, started_at, sub-second times, a
  status finer than argoitny's ...) go to the ``jobbridge`` attribute, a JSON string argoitny ignores; each
  entry applies only while the layout still implies what it implied when written, so argoitny's own later
  writes always win.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from types import MappingProxyType
from typing import Any, ClassVar

from pydantic import ValidationError

from jobbridge.errors import JobValidationError
from jobbridge.jobs import Job, JobStatus, as_utc
from jobbridge.legacy.codec import LegacyDecodeError, LegacyRecord, job_id_for
from jobbridge.legacy.extension import EXTENSION, apply_sidecar, sidecar_for
from jobbridge.legacy.values import dynamo, parse_timestamp, plain

SYSTEM = "argoitny"
TABLE_NAME = "algoitny_main"
SIDECAR = EXTENSION
META = "META"
STEP_MAX = 100  # argoitny truncates a progress step to 100 characters


@dataclass(frozen=True)
class Kind:
    """One argoitny job entity: its PK prefix, ``tp``, canonical type, progress name and ``dat`` fields."""

    prefix: str
    tp: str
    job_type: str
    progress_type: str
    fields: tuple[tuple[str, str], ...]  # (dat attribute, parameter name)
    has_generator: bool


SCRIPT_GENERATION = Kind(
    "SGJOB",
    "sgjob",
    "script_generation",
    "generation",
    (
        ("plt", "platform"),
        ("pid", "problem_id"),
        ("tit", "title"),
        ("url", "problem_url"),
        ("tag", "tags"),
        ("lng", "language"),
        ("con", "constraints"),
        ("mdl", "model"),
    ),
    True,
)
PROBLEM_EXTRACTION = Kind(
    "PEJOB",
    "pejob",
    "problem_extraction",
    "extraction",
    (
        ("plt", "platform"),
        ("pid", "problem_id"),
        ("url", "problem_url"),
        ("pidt", "problem_identifier"),
        ("tit", "title"),
    ),
    False,
)
KINDS: Mapping[str, Kind] = MappingProxyType({k.prefix: k for k in (SCRIPT_GENERATION, PROBLEM_EXTRACTION)})
_BY_TYPE = {k.job_type: k for k in KINDS.values()}
_BY_PROGRESS_TYPE = {k.progress_type: k for k in KINDS.values()}
_OPTIONAL_DAT = frozenset({"mdl"})  # written only when set (older writers never wrote it)
_STATE_DAT = frozenset({"gen", "sts", "tid", "err"})
_KEY_ATTRIBUTES = frozenset(
    {"PK", "SK", "tp", "dat", "crt", "upd", "GSI1PK", "GSI1SK", "GSI2PK", "GSI2SK", SIDECAR}
)
_PROG_SK = re.compile(r"^PROG#(\d+)(?:#(\d+))?$")


@dataclass(frozen=True)
class ArgoitnyProgress:
    """One decoded ``PROG#`` history item."""

    job_type: str
    legacy_id: str
    job_id: str
    at: datetime
    seq: int
    step: str
    message: str
    status: JobStatus
    legacy_status: str


# ---- values -------------------------------------------------------------------------------------------


def parse_time(value: Any, record_id: str, field: str) -> datetime:
    """Epoch seconds (Decimal/int/float or digits) or ISO 8601 (naive = UTC) as an aware UTC datetime.

    Unlike the other systems, a missing time is an error: ``crt`` is always written, and a ``PROG#`` key
    may hold the digits of its epoch (hence digit strings, which ``fromisoformat`` would refuse).
    """
    try:
        digits = str(value).strip()
        moment = parse_timestamp(int(digits) if digits.isdigit() else value)
    except (TypeError, ValueError, OverflowError):
        moment = None
    if moment is None:
        problem = f"{value!r} is not epoch seconds or an ISO 8601 timestamp"
        raise LegacyDecodeError(SYSTEM, record_id, field, problem)
    return moment


def epoch(value: datetime) -> int:
    """Whole epoch seconds, as argoitny's ``int(time.time())`` stores them."""
    return math.floor(value.timestamp())


def text(dat: Mapping[str, Any], key: str) -> str:
    """A ``dat`` string field; argoitny writes '' for "not set", and a NULL reads the same way."""
    value = dat.get(key)
    return "" if value is None else str(plain(value))


def decode_generator(raw: str) -> str:
    """``dat.gen`` is base64 of the generator code; like argoitny's reader, fall back to the raw text."""
    try:
        return base64.b64decode(raw.encode("ascii"), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeError, ValueError):
        return raw


def kind_for(job: Job) -> Kind:
    """The argoitny entity of a job type; other types have no place in argoitny's table."""
    kind = _BY_TYPE.get(job.type)
    if kind is None:
        known = ", ".join(_BY_TYPE)
        raise JobValidationError(
            f"job type {job.type!r} cannot be stored in argoitny's table: use one of {known}"
        )
    return kind


# ---- the codec ----------------------------------------------------------------------------------------


class ArgoitnyJobCodec:
    """argoitny's ``SGJOB#``/``PEJOB#`` META items and ``PROG#`` history items <-> canonical Jobs."""

    system: ClassVar[str] = SYSTEM
    #: ``dat.sts`` of META items (argoitny's PENDING/PROCESSING/COMPLETED/FAILED). A PENDING job has its
    #: Celery task enqueued already, so it is QUEUED (ready for a worker).
    to_canonical: ClassVar[Mapping[str, JobStatus]] = MappingProxyType(
        {
            "PENDING": JobStatus.QUEUED,
            "PROCESSING": JobStatus.RUNNING,
            "COMPLETED": JobStatus.COMPLETED,
            "FAILED": JobStatus.FAILED,
        }
    )
    #: argoitny has no retry, pause or cancel states: waiting states are PENDING, in-flight ones PROCESSING,
    #: and every unsuccessful end FAILED (CANCELLED/CRASHED are kept exactly by the sidecar).
    from_canonical: ClassVar[Mapping[JobStatus, str]] = MappingProxyType(
        {
            JobStatus.PENDING: "PENDING",
            JobStatus.QUEUED: "PENDING",
            JobStatus.RETRYING: "PENDING",
            JobStatus.RUNNING: "PROCESSING",
            JobStatus.PAUSED: "PROCESSING",
            JobStatus.CANCELLING: "PROCESSING",
            JobStatus.COMPLETED: "COMPLETED",
            JobStatus.FAILED: "FAILED",
            JobStatus.CRASHED: "FAILED",
            JobStatus.CANCELLED: "FAILED",
        }
    )
    #: ``dat.sts`` of progress items: 'started' and 'in_progress' are a step of a running job.
    progress_to_canonical: ClassVar[Mapping[str, JobStatus]] = MappingProxyType(
        {
            "started": JobStatus.RUNNING,
            "in_progress": JobStatus.RUNNING,
            "completed": JobStatus.COMPLETED,
            "failed": JobStatus.FAILED,
        }
    )
    progress_from_canonical: ClassVar[Mapping[JobStatus, str]] = MappingProxyType(
        {
            JobStatus.PENDING: "started",
            JobStatus.QUEUED: "started",
            JobStatus.RETRYING: "in_progress",
            JobStatus.RUNNING: "in_progress",
            JobStatus.PAUSED: "in_progress",
            JobStatus.CANCELLING: "in_progress",
            JobStatus.COMPLETED: "completed",
            JobStatus.FAILED: "failed",
            JobStatus.CRASHED: "failed",
            JobStatus.CANCELLED: "failed",
        }
    )

    # ---- META items ----

    def decode(self, record: Mapping[str, Any]) -> LegacyRecord:
        """Read one META item; raises LegacyDecodeError naming the item (its PK) and the field."""
        record_id = str(record.get("PK") or "<no PK>")
        kind, legacy_id = self._parse_key(record, record_id)
        dat = record.get("dat")
        if not isinstance(dat, Mapping):
            raise LegacyDecodeError(SYSTEM, record_id, "dat", "is missing or not a map")
        base = self._layout_job(record, dat, kind, legacy_id, record_id)
        job = apply_sidecar(base, record.get(SIDECAR), SYSTEM, record_id)
        return LegacyRecord(job=job, legacy_id=legacy_id, extra=self._extra(record, dat, kind))

    def encode(self, record: LegacyRecord) -> list[dict[str, Any]]:
        """The META item of this job (Decimal numbers, base64 generator code, GSI keys)."""
        kind = kind_for(record.job)
        item = self._layout_item(record, kind)
        derived = self._layout_job(item, item["dat"], kind, record.legacy_id, item["PK"])
        side = sidecar_for(record.job, derived)
        if side is not None:
            item[SIDECAR] = side
        return [item]

    @staticmethod
    def gsi1(kind: Kind, status: str, created: int, legacy_id: str) -> tuple[str, str]:
        """GSI1 (list by status, newest first): '{PREFIX}#STATUS#{sts}' and '{crt:020d}#{id}'."""
        return f"{kind.prefix}#STATUS#{status}", f"{created:020d}#{legacy_id}"

    @staticmethod
    def _parse_key(record: Mapping[str, Any], record_id: str) -> tuple[Kind, str]:
        """The entity and legacy id from ``PK``; only META items are jobs."""
        prefix, _, legacy_id = record_id.partition("#")
        if record.get("SK") != META:
            problem = f"is {record.get('SK')!r}, not 'META' (progress items are read by decode_progress)"
            raise LegacyDecodeError(SYSTEM, record_id, "SK", problem)
        if prefix not in KINDS or not legacy_id:
            raise LegacyDecodeError(SYSTEM, record_id, "PK", "is not 'SGJOB#{id}' or 'PEJOB#{id}'")
        return KINDS[prefix], legacy_id

    def _status(self, raw: str, record_id: str) -> JobStatus:
        """The canonical status of ``dat.sts``; an unknown one is an error, never a guess."""
        status = self.to_canonical.get(raw) or self.to_canonical.get(raw.strip().upper())
        if status is None:
            known = ", ".join(self.to_canonical)
            problem = f"(dat.sts) {raw!r} is not an argoitny job status ({known})"
            raise LegacyDecodeError(SYSTEM, record_id, "status", problem)
        return status

    def _layout_job(
        self, record: Mapping[str, Any], dat: Mapping[str, Any], kind: Kind, legacy_id: str, record_id: str
    ) -> Job:
        """The Job the argoitny attributes alone describe (before the sidecar is applied)."""
        status = self._status(text(dat, "sts"), record_id)
        if record.get("crt") is None:
            raise LegacyDecodeError(SYSTEM, record_id, "crt", "is missing")
        created = parse_time(record["crt"], record_id, "crt")
        updated = parse_time(record["upd"], record_id, "upd") if record.get("upd") is not None else created
        generator = text(dat, "gen") if kind.has_generator else ""
        fields = {
            "id": job_id_for(legacy_id),
            "name": self._name(dat, kind, legacy_id),
            "type": kind.job_type,
            "parameters": self._parameters(dat, kind),
            "status": status,
            "progress": 100.0 if status is JobStatus.COMPLETED else 0.0,
            "created_at": created,
            "finished_at": updated if status in (JobStatus.COMPLETED, JobStatus.FAILED) else None,
            "attempts": 1 if text(dat, "tid") else 0,
            "error": text(dat, "err") or None,
            "result": {"generator_code": decode_generator(generator)} if generator else None,
        }
        try:
            return Job(**fields)
        except ValidationError as exc:
            error = exc.errors()[0]
            field = f"Job.{error['loc'][0]}" if error["loc"] else "dat"
            raise LegacyDecodeError(SYSTEM, record_id, field, f"cannot be read: {error['msg']}") from None

    @staticmethod
    def _name(dat: Mapping[str, Any], kind: Kind, legacy_id: str) -> str:
        """A readable name: platform, problem and title, else the URL, else the PK."""
        words = " ".join(part for part in (text(dat, "plt"), text(dat, "pid"), text(dat, "tit")) if part)
        return (words or text(dat, "url") or f"{kind.prefix}#{legacy_id}")[:200]

    @staticmethod
    def _parameters(dat: Mapping[str, Any], kind: Kind) -> dict[str, Any]:
        """The set ``dat`` fields under their long names ('' and [] mean "not set" in argoitny)."""
        parameters: dict[str, Any] = {}
        for short, name in kind.fields:
            value = plain(dat.get(short))
            if value not in (None, "", []):
                parameters[name] = value
        return parameters

    @staticmethod
    def _extra(record: Mapping[str, Any], dat: Mapping[str, Any], kind: Kind) -> dict[str, Any]:
        """Legacy-only values: Celery task id, ``upd``, and attributes or dat fields not mapped here."""
        known_dat = {short for short, _ in kind.fields} | _STATE_DAT
        extra: dict[str, Any] = {"upd": plain(record.get("upd", record.get("crt")))}
        if text(dat, "tid"):
            extra["tid"] = text(dat, "tid")
        unknown_dat = {k: plain(v) for k, v in dat.items() if k not in known_dat}
        if unknown_dat:
            extra["dat"] = unknown_dat
        attributes = {k: plain(v) for k, v in record.items() if k not in _KEY_ATTRIBUTES}
        if attributes:
            extra["attributes"] = attributes
        return extra

    def _layout_item(self, record: LegacyRecord, kind: Kind) -> dict[str, Any]:
        """The META item without the sidecar."""
        job, extra = record.job, record.extra
        created = epoch(job.created_at)
        status = self.from_canonical[job.status]
        item: dict[str, Any] = dynamo(extra.get("attributes") or {})
        gsi1pk, gsi1sk = self.gsi1(kind, status, created, record.legacy_id)
        item.update(
            {
                "PK": f"{kind.prefix}#{record.legacy_id}",
                "SK": META,
                "tp": kind.tp,
                "dat": self._dat(job, kind, extra, status),
                "crt": Decimal(created),
                "upd": Decimal(self._updated(job, extra)),
                "GSI1PK": gsi1pk,
                "GSI1SK": gsi1sk,
            }
        )
        platform, problem = item["dat"].get("plt"), item["dat"].get("pid")
        if kind is SCRIPT_GENERATION and platform and problem:
            item["GSI2PK"], item["GSI2SK"] = f"SGJOB#{platform}#{problem}", gsi1sk
        return item

    @staticmethod
    def _dat(job: Job, kind: Kind, extra: Mapping[str, Any], status: str) -> dict[str, Any]:
        """The ``dat`` map: parameters under their short names, then the state fields."""
        dat: dict[str, Any] = dynamo(extra.get("dat") or {})
        for short, name in kind.fields:
            value = job.parameters.get(name)
            if short == "tag":
                dat[short] = [str(tag) for tag in value] if isinstance(value, list) else []
            elif value not in (None, "") or short not in _OPTIONAL_DAT:
                dat[short] = "" if value is None else str(value)
        if kind.has_generator:
            code = job.result.get("generator_code") if isinstance(job.result, dict) else None
            dat["gen"] = (
                base64.b64encode(code.encode("utf-8")).decode("ascii") if isinstance(code, str) else ""
            )
        dat["sts"] = status
        dat["tid"] = str(extra.get("tid") or "")
        dat["err"] = job.error or ""
        return dat

    @staticmethod
    def _updated(job: Job, extra: Mapping[str, Any]) -> int:
        """``upd``: the stored one, but never older than the job's latest timestamp."""
        stamps = [epoch(t) for t in (job.created_at, job.started_at, job.finished_at) if t is not None]
        stored = extra.get("upd")
        if isinstance(stored, int | float) and not isinstance(stored, bool):
            stamps.append(math.floor(stored))
        return max(stamps)

    # ---- PROG# history items ----

    def progress_item(
        self, job: Job | LegacyRecord, at: datetime, seq: int, step: str, message: str
    ) -> dict[str, Any]:
        """A progress history item of ``job`` at ``at``; its ``dat.sts`` follows the job's status.

        ``seq`` orders entries within one second: 0 gives argoitny's own key ``PROG#{epoch}`` (so re-writing a
        migrated entry is idempotent), n > 0 gives ``PROG#{epoch}#{n:06d}``, which sorts after it, so two
        entries of one second no longer overwrite each other (argoitny's own writer loses one).
        """
        if seq < 0:
            raise ValueError(f"seq must be 0 or more, not {seq}")
        record = job if isinstance(job, LegacyRecord) else LegacyRecord(job=job, legacy_id=job.id)
        kind, when = kind_for(record.job), epoch(as_utc(at))
        sort_key = f"PROG#{when}" if seq == 0 else f"PROG#{when}#{seq:06d}"
        return {
            "PK": f"JOB#{kind.progress_type}#{record.legacy_id}",
            "SK": sort_key,
            "tp": "prog",
            "dat": {
                "stp": step[:STEP_MAX],
                "msg": message,
                "sts": self.progress_from_canonical[record.job.status],
            },
            "crt": Decimal(when),
        }

    def decode_progress(self, item: Mapping[str, Any]) -> ArgoitnyProgress:
        """Read one ``PROG#`` item; raises LegacyDecodeError naming the item and the field."""
        record_id = f"{item.get('PK')}/{item.get('SK')}"
        head, _, rest = str(item.get("PK") or "").partition("#")
        progress_type, _, legacy_id = rest.partition("#")
        if head != "JOB" or progress_type not in _BY_PROGRESS_TYPE or not legacy_id:
            raise LegacyDecodeError(SYSTEM, record_id, "PK", "is not 'JOB#{generation|extraction}#{id}'")
        match = _PROG_SK.match(str(item.get("SK") or ""))
        if match is None:
            raise LegacyDecodeError(SYSTEM, record_id, "SK", "is not 'PROG#{epoch}' or 'PROG#{epoch}#{seq}'")
        raw_dat = item.get("dat")
        dat: Mapping[str, Any] = raw_dat if isinstance(raw_dat, Mapping) else {}
        raw_status = text(dat, "sts") or "in_progress"  # argoitny's reader defaults the same way
        status = self.progress_to_canonical.get(raw_status)
        if status is None:
            known = ", ".join(self.progress_to_canonical)
            problem = f"(dat.sts) {raw_status!r} is not an argoitny progress status ({known})"
            raise LegacyDecodeError(SYSTEM, record_id, "status", problem)
        at = parse_time(item["crt"] if item.get("crt") is not None else match.group(1), record_id, "crt")
        return ArgoitnyProgress(
            job_type=_BY_PROGRESS_TYPE[progress_type].job_type,
            legacy_id=legacy_id,
            job_id=job_id_for(legacy_id),
            at=at,
            seq=int(match.group(2) or 0),
            step=text(dat, "stp"),
            message=text(dat, "msg"),
            status=status,
            legacy_status=raw_status,
        )
