"""``bonexray pacs analyze``: studies in over DICOMweb (QIDO-RS, WADO-RS), results back by STOW-RS.

Per study: QIDO lists its instances; those that are not radiographs are named and skipped without
being downloaded; if the study already holds this model's SR for the same source images (the UIDs
are derived from study, model SHA-256 and sources: :func:`results.result_uids`), nothing is fetched
or stored. Otherwise each radiograph is retrieved (WADO-RS, one by one, so one that vanished or is
damaged is one line), the study analysed (:func:`analysis.analyse_study`), every result built and
validated, and all of them sent in one STOW-RS request. Lines on stdout say what was stored; lines
on stderr name each instance that could not be analysed. An unreachable server, a refused login or
an answer that is no DICOMweb (a login page, a proxy's error page: its status, content type and
first characters are quoted) stops the run with one line (exit 2); a study with problems gives exit
status 1.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, TextIO

from ..errors import BonexrayError
from .analysis import RADIOGRAPH_SOP_CLASSES, Instance, StudyAnalysis, analyse_study
from .results import ModelIdentity, ResultUIDs, build_results, result_uids

PROG = "bonexray pacs analyze"
SOP_CLASS, SOP_INSTANCE, SERIES_UID, STUDY_UID, MODALITY = "00080016", "00080018", "0020000E", "0020000D", "00080060"
MANUFACTURER_TAG = "00080070"


def _value(item: dict, tag: str) -> str | None:
    v = (item.get(tag) or {}).get("Value")
    return str(v[0]) if v else None


def _short(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= 160 else text[:157] + "..."


class PacsServer:
    """A DICOMweb client whose failures are one-line :class:`BonexrayError` s (or None for a 404)."""

    def __init__(self, url: str, user: str | None = None, password: str | None = None, timeout: float = 60) -> None:
        from dicomweb_client import DICOMwebClient
        from dicomweb_client.session_utils import create_session, create_session_from_user_pass

        self.url = url.rstrip("/")
        session = create_session_from_user_pass(user, password or "") if user else create_session()
        self._last = None  # the last HTTP response: what to quote when its body is no DICOMweb answer
        session.hooks.setdefault("response", []).append(self._remember)
        self.client = DICOMwebClient(self.url, session=session, timeout=timeout)

    def _remember(self, response, *args, **kwargs):
        self._last = response
        return response

    def _not_dicomweb(self, what: str) -> BonexrayError:
        r = self._last
        if r is None:
            return BonexrayError(f"{self.url}: {what}: the server's answer is not DICOMweb")
        text = " ".join(r.content[:200].decode("utf-8", "replace").split())
        start = text if len(text) <= 80 else text[:77] + "..."
        return BonexrayError(
            f"{self.url}: {what}: the answer is not DICOMweb (HTTP {r.status_code}, Content-Type "
            f"{r.headers.get('Content-Type') or 'none'}, body starts {start!r}); is --url the DICOMweb root "
            "(e.g. http://host:8042/dicom-web), not a web page or a login?")

    def call(self, what: str, fn, *args, missing_ok: bool = False, **kwargs) -> Any:
        import requests

        try:
            return fn(*args, **kwargs)
        except requests.exceptions.HTTPError as err:
            status = getattr(err.response, "status_code", None)
            if status in (401, 403):
                raise BonexrayError(f"{self.url}: {status} {'Unauthorized' if status == 401 else 'Forbidden'} "
                                    f"({what}): give a user allowed on this server (--user, --password or "
                                    f"$BONEXRAY_PACS_PASSWORD)") from None
            if status == 404 and missing_ok:
                return None
            raise BonexrayError(f"{self.url}: {what} failed: HTTP {status} ({_short(err)})") from None
        except requests.exceptions.ConnectionError as err:
            raise BonexrayError(f"{self.url}: cannot reach the server ({what}): {_short(err)}") from None
        except requests.exceptions.Timeout:
            raise BonexrayError(f"{self.url}: no answer in time ({what})") from None
        except requests.exceptions.JSONDecodeError:  # before RequestException: it is one too
            raise self._not_dicomweb(what) from None
        except requests.exceptions.RequestException as err:
            raise BonexrayError(f"{self.url}: {what} failed ({_short(err)})") from None

    def find_studies(self, studies: Sequence[str], date: str | None, modality: str | None) -> list[str]:
        filters: dict[str, str] = {}
        if date:
            filters["StudyDate"] = date
        if modality:
            filters["ModalitiesInStudy"] = modality
        if studies:
            return list(studies)
        found = self.call("search for studies", self.client.search_for_studies, search_filters=filters,
                          get_remaining=True) or []
        return [uid for uid in (_value(s, STUDY_UID) for s in found) if uid]

    def instances(self, study: str) -> list[dict] | None:
        return self.call(f"list the instances of study {study}", self.client.search_for_instances,
                         study_instance_uid=study, fields=["SOPClassUID", "Modality", "Manufacturer"],
                         get_remaining=True, missing_ok=True)


def run_analyze(model: str, url: str, studies: Sequence[str] = (), date: str | None = None,
                modality: str | None = None, user: str | None = None, password: str | None = None,
                device: str = "auto", backend: str = "auto", dry_run: bool = False,
                out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Analyse the selected studies on the DICOMweb server at ``url``; returns the exit status."""
    out, err = out or sys.stdout, err or sys.stderr
    if not (studies or date or modality):
        raise BonexrayError("choose the studies: --study UID (repeatable), --date YYYYMMDD[-YYYYMMDD] or --modality CR")
    server = PacsServer(url, user, password)
    uids = server.find_studies(studies, date, modality)  # reaches the server before the model loads
    if not uids:
        print(f"{PROG}: no study on {server.url} matches the selection", file=out, flush=True)
        return 0
    from ..inference.predictor import Predictor

    predictor = Predictor(model, device=device, backend=backend)
    identity = ModelIdentity.from_predictor(predictor)
    failed = False
    for study in uids:
        failed |= not _analyze_study(server, predictor, identity, study, dry_run, out, err)
    return 1 if failed else 0


def _line(stream: TextIO, text: str) -> None:
    print(f"{PROG}: {text}", file=stream, flush=True)


def _analyze_study(server: PacsServer, predictor, identity: ModelIdentity, study: str, dry_run: bool,
                   out: TextIO, err: TextIO) -> bool:
    """One study; True when everything in it was analysed (and stored, unless ``dry_run``)."""
    listing = server.instances(study)
    if not listing:
        _line(err, f"study {study}: not found on {server.url} (or it holds no instance)")
        return False
    sources, skipped = _sort_listing(listing)
    uids = result_uids(study, identity, [sop for _, sop in sources])
    if any(_value(item, SOP_INSTANCE) == uids.sr_instance for item in listing):
        _line(out, f"study {study}: already analysed by {identity.marker} (SR {uids.sr_instance}); nothing stored")
        return True
    _report_skipped(study, skipped, uids, err)
    instances, ok, missing = _retrieve_sources(server, study, sources, err)
    if missing and missing == len(sources) and not server.instances(study):
        _line(err, f"study {study}: removed from the server while it was read; nothing stored")
        return False
    analysis = analyse_study(predictor, study, instances)
    for name, reason in analysis.problems:
        _line(err, f"study {study}: instance {name}: {reason}")
        ok = False
    if not analysis.images:
        _line(err, f"study {study}: no radiograph could be analysed; nothing stored")
        return False
    verdict = _verdict(analysis.study_record or {})
    results = build_results(analysis, identity, uids=uids)  # everything built before anything is sent
    if dry_run:
        _line(out, f"study {study}: {len(analysis.images)} image(s) analysed ({verdict}); --dry-run: nothing stored")
        return ok
    return _store_results(server, study, identity, uids, analysis, results, verdict, out, err) and ok


def _sort_listing(listing: list) -> tuple[list[tuple], list[tuple]]:
    """The study's instances to analyse, ``(series, sop)``, and those skipped, ``(sop, sop_class, modality)``:
    anything bonexray stored, and what is not a radiograph."""
    sources, skipped = [], []
    for item in listing:
        sop, sop_class = _value(item, SOP_INSTANCE), _value(item, SOP_CLASS)
        if sop is None:
            continue
        if _value(item, MANUFACTURER_TAG) == "bonexray" or sop_class not in RADIOGRAPH_SOP_CLASSES:
            skipped.append((sop, sop_class, _value(item, MODALITY)))
        else:
            sources.append((_value(item, SERIES_UID), sop))
    return sources, skipped


def _report_skipped(study: str, skipped: list[tuple], uids: ResultUIDs, err: TextIO) -> None:
    """One line per skipped instance, except this model's own earlier captures of the study."""
    from pydicom.uid import UID

    for sop, sop_class, modality in skipped:
        if sop in uids.sc_instances.values():
            continue  # this model's own earlier captures of the study
        what = UID(sop_class).name if sop_class else "unknown SOP class"
        _line(err, f"study {study}: instance {sop}: skipped: not a radiograph ({modality or '?'}, {what})")


def _retrieve_sources(server: PacsServer, study: str, sources: list[tuple],
                      err: TextIO) -> tuple[list[Instance], bool, int]:
    """The instances read, whether all were, and how many were gone (404); one line per instance not read."""
    instances, ok, missing = [], True, 0
    for series, sop in sources:
        try:
            ds = server.call(f"retrieve instance {sop}", server.client.retrieve_instance, study, series, sop,
                             missing_ok=True)
        except BonexrayError:
            raise
        except Exception as exc:  # noqa: BLE001 - a damaged instance (unparseable part) is one line
            _line(err, f"study {study}: instance {sop}: cannot be read ({type(exc).__name__}: {_short(exc)})")
            ok = False
            continue
        if ds is None:
            _line(err, f"study {study}: instance {sop}: gone from the server while the study was read (404)")
            ok, missing = False, missing + 1
            continue
        instances.append(Instance(sop, ds))
    return instances, ok, missing


def _verdict(rec: dict) -> str:
    """The study's verdict in the progress line."""
    return ("cannot assess" if rec.get("in_scope") is False else
            f"{'abnormal' if rec.get('abnormal') else 'normal'} p={float(rec['prob_abnormal']):.3f}, "
            f"{rec.get('body_part')}")


def _store_results(server: PacsServer, study: str, identity: ModelIdentity, uids: ResultUIDs,
                   analysis: StudyAnalysis, results: list, verdict: str, out: TextIO, err: TextIO) -> bool:
    """Send ``results`` to the server; False (one line) when it refuses any."""
    response = server.call(f"store the results of study {study}", server.client.store_instances, results,
                           study_instance_uid=study)
    failed_items = list(getattr(response, "FailedSOPSequence", []) or []) if response is not None else []
    if failed_items:
        bad = ", ".join(str(getattr(i, "ReferencedSOPInstanceUID", "?")) for i in failed_items)
        _line(err, f"study {study}: the server refused {len(failed_items)} of {len(results)} result(s) ({bad}); "
                   f"a rerun resends the same instances")
        return False
    _line(out, f"study {study}: {len(analysis.images)} image(s) analysed ({verdict}); stored SR {uids.sr_instance} "
               f"and {len(results) - 1} secondary capture(s) ({identity.marker})")
    return True
    response = server.call(f"store the results of study {study}", server.client.store_instances, results,
                           study_instance_uid=study)
    failed_items = list(getattr(response, "FailedSOPSequence", []) or []) if response is not None else []
    if failed_items:
        bad = ", ".join(str(getattr(i, "ReferencedSOPInstanceUID", "?")) for i in failed_items)
        _line(err, f"study {study}: the server refused {len(failed_items)} of {len(results)} result(s) ({bad}); "
                   f"a rerun resends the same instances")
        return False
    _line(out, f"study {study}: {len(analysis.images)} image(s) analysed ({verdict}); stored SR {uids.sr_instance} "
               f"and {len(results) - 1} secondary capture(s) ({identity.marker})")
    return ok
