"""``bonexray pacs listen``: a DICOM storage SCP (pynetdicom) for sites without DICOMweb.

Instances received by C-STORE are grouped by Study Instance UID. A study counts as complete once
none of its instances has arrived for ``quiet_seconds``; it is then analysed on a worker thread
(:func:`analysis.analyse_study`, the path of ``predict --study``), its results built whole
(:func:`results.build_results`) and sent by C-STORE to the destination (captures first, SR last).
Result UIDs derive from study, model and sources, so a study pushed twice yields the same
instances (the destination keeps one copy) and the listener does not send them twice.
"""
from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field
from typing import TextIO

from ..errors import BonexrayError
from .analysis import Instance, analyse_study
from .results import ModelIdentity, build_results, result_uids

PROG = "bonexray pacs listen"
SR_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
SC_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture


@dataclass(frozen=True)
class Destination:
    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> "Destination":
        try:
            aet, rest = text.split("@", 1)
            host, port = rest.rsplit(":", 1)
            dest = cls(aet.strip(), host.strip().strip("[]"), int(port))
        except ValueError:
            raise BonexrayError(f"--dest {text!r}: expected AET@HOST:PORT, e.g. ORTHANC@127.0.0.1:4242") from None
        if not dest.ae_title or len(dest.ae_title) > 16 or not dest.host or not 0 < dest.port < 65536:
            raise BonexrayError(f"--dest {text!r}: expected AET@HOST:PORT (AE title of 1-16 characters, port 1-65535)")
        return dest

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass
class _Pending:
    instances: list[Instance] = field(default_factory=list)
    last: float = 0.0


class Listener:
    """The SCP and its worker: ``start()``, ``stop()``; ``run_forever()`` for the CLI."""

    def __init__(self, predictor, dest: Destination, port: int, host: str = "127.0.0.1", ae_title: str = "BONEXRAY",
                 quiet_seconds: float = 5.0, out: TextIO | None = None, err: TextIO | None = None) -> None:
        if quiet_seconds <= 0:
            raise BonexrayError(f"--quiet-seconds must be positive, got {quiet_seconds}")
        self.predictor, self.dest, self.port, self.host = predictor, dest, port, host
        self.ae_title, self.quiet_seconds = ae_title, quiet_seconds
        self.identity = ModelIdentity.from_predictor(predictor)
        self.out, self.err = out or sys.stdout, err or sys.stderr
        self._pending: dict[str, _Pending] = {}
        self._sent: set[str] = set()  # SR instance UIDs already delivered by this listener
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server = None
        self._worker: threading.Thread | None = None
        self.studies_done = 0  # studies handled (sent, skipped as already sent, or failed)

    def _line(self, stream: TextIO, text: str) -> None:
        print(f"{PROG}: {text}", file=stream, flush=True)

    # ------------------------------------------------------------------ receiving

    def _on_store(self, event) -> int:
        try:
            data = event.encoded_dataset()  # Part-10 bytes: the decode path reads these
            ds = event.dataset
            ds.file_meta = event.file_meta
            study = str(ds.get("StudyInstanceUID", "") or "")
            name = str(ds.get("SOPInstanceUID", "?"))
        except Exception as exc:  # noqa: BLE001 - a dataset that cannot be parsed is refused, the SCP stays up
            self._line(self.err, f"instance from {event.assoc.requestor.ae_title}: cannot be parsed "
                                 f"({type(exc).__name__}: {exc}); refused")
            return 0xC210  # "cannot understand"
        if not study:  # nothing to group it by: a study is what gets analysed and answered
            from pydicom.uid import UID

            sop_class = str(ds.get("SOPClassUID", "") or "")
            self._line(self.err, f"instance {name} from {event.assoc.requestor.ae_title} "
                                 f"({UID(sop_class).name if sop_class else 'unknown SOP class'}): no Study Instance UID; "
                                 "refused")
            return 0xC210  # "cannot understand"
        with self._lock:
            pending = self._pending.setdefault(study, _Pending())
            pending.instances.append(Instance(name, ds, data))
            pending.last = time.monotonic()
        return 0x0000

    def start(self) -> "Listener":
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        ae = AE(ae_title=self.ae_title)
        ae.supported_contexts = AllStoragePresentationContexts
        try:
            self._server = ae.start_server((self.host, self.port), block=False,
                                           evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        except OSError as exc:
            raise BonexrayError(f"cannot listen on {self.host}:{self.port} ({exc.strerror or exc})") from None
        self._worker = threading.Thread(target=self._work, name="bonexray-pacs-worker", daemon=True)
        self._worker.start()
        self._line(self.out, f"{self.ae_title} listening on {self.host}:{self.port}; results go to {self.dest} "
                             f"({self.identity.marker}); a study is analysed {self.quiet_seconds:g} s after its last instance")
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
        if self._worker is not None:
            self._worker.join(timeout=60)

    def run_forever(self) -> int:
        """Serve until Ctrl-C or SIGTERM (a service manager's stop); a study being analysed is finished first."""
        import signal

        def request_stop(signum, frame) -> None:
            self._line(self.out, f"stopping ({signal.Signals(signum).name})")
            self._stop.set()

        previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        self.start()
        try:
            while not self._stop.wait(0.5):
                pass
        finally:
            self.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return 0

    # ------------------------------------------------------------------ analysing

    def _due(self) -> list[tuple[str, list[Instance]]]:
        now = time.monotonic()
        with self._lock:
            ready = [s for s, p in self._pending.items() if now - p.last >= self.quiet_seconds]
            return [(s, self._pending.pop(s).instances) for s in ready]

    def _work(self) -> None:
        while not self._stop.wait(min(0.2, self.quiet_seconds / 4)):
            for study, instances in self._due():
                try:
                    self._handle(study, instances)
                except BonexrayError as exc:
                    self._line(self.err, f"study {study}: {exc}")
                except Exception as exc:  # noqa: BLE001 - one study's failure must not stop the listener
                    self._line(self.err, f"study {study}: unexpected error ({type(exc).__name__}: {exc}); "
                                         "nothing sent")
                finally:
                    self.studies_done += 1

    def _handle(self, study: str, instances: list[Instance]) -> None:
        analysis = analyse_study(self.predictor, study, instances)
        for name, why in analysis.skipped:
            self._line(self.err, f"study {study}: instance {name}: skipped: {why}")
        for name, reason in analysis.problems:
            self._line(self.err, f"study {study}: instance {name}: {reason}")
        if not analysis.images:
            if analysis.skipped and not analysis.problems:  # SR, RT plan, PDF...: nothing wrong, nothing to do
                self._line(self.out, f"study {study}: no radiograph among its {len(analysis.skipped)} instance(s); "
                                     "nothing to analyse, nothing sent")
            else:
                self._line(self.err, f"study {study}: no radiograph could be analysed; nothing sent")
            return
        uids = result_uids(study, self.identity, analysis.radiograph_uids)
        if uids.sr_instance in self._sent:
            self._line(self.out, f"study {study}: already analysed and sent by {self.identity.marker}; nothing sent")
            return
        results = build_results(analysis, self.identity, uids=uids)  # whole before anything is sent
        self._send(study, results)
        self._sent.add(uids.sr_instance)
        self._line(self.out, f"study {study}: {len(analysis.images)} image(s) analysed; sent SR {uids.sr_instance} "
                             f"and {len(results) - 1} secondary capture(s) to {self.dest}")

    def _send(self, study: str, results: list) -> None:
        from pynetdicom import AE
        from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

        ae = AE(ae_title=self.ae_title)
        for sop_class in (SC_SOP_CLASS, SR_SOP_CLASS):
            ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        assoc = ae.associate(self.dest.host, self.dest.port, ae_title=self.dest.ae_title)
        if not assoc.is_established:
            why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "not established"
            raise BonexrayError(f"cannot send results to {self.dest}: association {why}; nothing sent")
        try:
            for n, ds in enumerate(results):
                status = assoc.send_c_store(ds)
                code = getattr(status, "Status", None)
                if code not in (0x0000, 0xB000, 0xB006, 0xB007):  # success or warning: stored
                    code_text = "no answer" if code is None else f"status 0x{code:04X}"
                    raise BonexrayError(f"{self.dest} did not store result {ds.SOPInstanceUID} ({code_text}); "
                                        f"{n} of {len(results)} stored, the SR is sent last; a new push resends "
                                        "the same instances")
        finally:
            assoc.release()


def run_listen(model: str, port: int, dest: str, host: str = "127.0.0.1", ae_title: str = "BONEXRAY",
               quiet_seconds: float = 5.0, device: str = "auto", backend: str = "auto") -> int:
    from ..inference.predictor import Predictor

    destination = Destination.parse(dest)
    if not ae_title or len(ae_title) > 16:
        raise BonexrayError(f"--ae-title {ae_title!r}: an AE title has 1-16 characters")
    predictor = Predictor(model, device=device, backend=backend)
    return Listener(predictor, destination, port, host=host, ae_title=ae_title,
                    quiet_seconds=quiet_seconds).run_forever()
