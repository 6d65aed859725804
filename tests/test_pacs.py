"""bonexray pacs: SR / secondary-capture building, and both front ends against a real Orthanc.

The Orthanc tests start Debian's Orthanc (``apt-get install orthanc orthanc-dicomweb``; ``.ci/run``
installs it as root) on free loopback ports with a temporary storage folder; where it is not
installed they skip with the reason.
"""
from __future__ import annotations

import io
import json
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from builders import make_checkpoint
from conftest import SHARED_DATA

pydicom = pytest.importorskip("pydicom")
hd = pytest.importorskip("highdicom")

from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402

ORTHANC = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
RG3 = SHARED_DATA / "dicom" / "RG3_UNCR.dcm"
CR_CLASS = "1.2.840.10008.5.1.4.1.1.1"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
requires_orthanc = pytest.mark.skipif(
    not (ORTHANC.exists() and DICOMWEB_PLUGIN.exists()),
    reason=f"Orthanc with its DICOMweb plugin is not installed ({ORTHANC}, {DICOMWEB_PLUGIN}); "
           "apt-get install orthanc orthanc-dicomweb")


# --------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _meta(ds: Dataset) -> None:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID


def _patient_study(ds: Dataset, study: str) -> None:
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Bone", "PID-23", "19700101", "F"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20240102", "101500", "ACC23", "S23"
    ds.ReferringPhysicianName = ""
    ds.SeriesNumber, ds.InstanceNumber = 1, 1


def synthetic_cr(study: str, rows: int = 120, cols: int = 96, photometric: str = "MONOCHROME1", seed: int = 0) -> Dataset:
    """A CR image: 12-bit noise with a bright (bone) bar, windowed."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = CR_CLASS, generate_uid(), "CR"
    _meta(ds)
    _patient_study(ds, study)
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, cols, 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.PatientOrientation = ["L", "F"]
    a = (np.random.default_rng(seed).random((rows, cols)) * 1500).astype(np.uint16)
    a[rows // 3: rows // 2, :] = 3500
    ds.PixelData = a.tobytes()
    return ds


def synthetic_pdf(study: str) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = "1.2.840.10008.5.1.4.1.1.104.1", generate_uid(), "DOC"
    _meta(ds)
    _patient_study(ds, study)
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocument = b"%PDF-1.4\n%%EOF\n"
    return ds


def synthetic_ct(study: str) -> Dataset:
    ds = synthetic_cr(study, photometric="MONOCHROME2")
    ds.SOPClassUID, ds.Modality = "1.2.840.10008.5.1.4.1.1.2", "CT"
    _meta(ds)
    return ds


def part10(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


class Orthanc:
    """Debian's Orthanc on free loopback ports, DICOMweb on, storage in ``root``."""

    def __init__(self, root: Path, modalities: dict | None = None, users: dict | None = None) -> None:
        self.http_port, self.dicom_port = free_port(), free_port()
        self.root = root
        (root / "config").mkdir(parents=True)
        (root / "db").mkdir()
        config = {
            "Name": "bonexray-test", "StorageDirectory": str(root / "db"), "IndexDirectory": str(root / "db"),
            "HttpPort": self.http_port, "DicomPort": self.dicom_port, "DicomAet": "ORTHANC",
            "RemoteAccessAllowed": False, "AuthenticationEnabled": bool(users), "RegisteredUsers": users or {},
            "Plugins": [str(DICOMWEB_PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "DicomModalities": modalities or {}, "DicomAlwaysAllowStore": True,
        }
        (root / "config" / "orthanc.json").write_text(json.dumps(config))
        self.log = open(root / "orthanc.log", "wb")
        self.proc = subprocess.Popen([str(ORTHANC), str(root / "config")], cwd=root, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.dicomweb = f"{self.url}/dicom-web"
        self.auth = next(iter(users.items())) if users else None
        import requests

        for _ in range(300):
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited: {(root / 'orthanc.log').read_text()[-2000:]}")
            try:
                if requests.get(f"{self.url}/system", auth=self.auth, timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.1)
        else:
            self.close()
            raise RuntimeError("Orthanc did not start in 30 s")

    def upload(self, data: bytes) -> None:
        import requests

        r = requests.post(f"{self.url}/instances", data=data, auth=self.auth, timeout=30)
        assert r.status_code == 200, r.text

    def instances(self, study: str) -> list[Dataset]:
        """Every instance of the study as stored (WADO-RS)."""
        from dicomweb_client import DICOMwebClient

        return DICOMwebClient(self.dicomweb).retrieve_study(study)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@pytest.fixture(scope="session")
def listener_port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory, listener_port):
    if not (ORTHANC.exists() and DICOMWEB_PLUGIN.exists()):
        pytest.skip("Orthanc is not installed (apt-get install orthanc orthanc-dicomweb)")
    server = Orthanc(tmp_path_factory.mktemp("orthanc"),
                     modalities={"bonexray": ["BONEXRAY", "127.0.0.1", listener_port]})
    yield server
    server.close()


@pytest.fixture(scope="session")
def pacs_model(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("pacs-model") / "model.ckpt",
                           body_parts=("hand", "leg", "shoulder", "mixed"), image_size=64)


def _run(argv, capsys) -> tuple[int, str, str]:
    from bonexray.cli import main

    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _content_items(container, found=None):
    """Every content item of an SR tree, depth first."""
    found = [] if found is None else found
    for item in getattr(container, "ContentSequence", []):
        found.append(item)
        _content_items(item, found)
    return found


def _codes(items, name_code: str) -> list[str]:
    return [i.ConceptCodeSequence[0].CodeValue for i in items
            if i.ValueType == "CODE" and i.ConceptNameCodeSequence[0].CodeValue == name_code]


def _texts(items) -> list[str]:
    return [str(i.TextValue) for i in items if i.ValueType == "TEXT"]


# --------------------------------------------------------------------------- the builders (no server)


def test_sr_and_capture_carry_boxes_scope_and_references(pacs_model):
    """Records with boxes become POLYLINE SCOORDs on the source image and red marks on the capture;
    an out-of-scope image is "cannot assess" with its reason; patient/study copied, new series."""
    from bonexray.inference.predictor import Predictor
    from bonexray.pacs.analysis import Instance, analyse_study
    from bonexray.pacs.results import ModelIdentity, build_results

    predictor = Predictor(pacs_model, backend="torch")
    study = generate_uid()
    first, second = synthetic_cr(study, seed=1), synthetic_cr(study, seed=2, photometric="MONOCHROME2")
    analysis = analyse_study(predictor, study, [Instance("a", first), Instance("b", second)])
    assert not analysis.problems and len(analysis.images) == 2
    rec_a, rec_b = analysis.images[0].record, analysis.images[1].record
    from bonexray.core.findings import Box

    rec_a = analysis.images[0].record = rec_a.model_copy(update=dict(
        body_part="leg", boxes=[Box(x0=10.0, y0=20.0, x1=50.0, y1=70.0, score=0.8, level="definite")]))
    rec_b = analysis.images[1].record = rec_b.model_copy(update=dict(
        in_scope=False, scope_reason="not a bone radiograph", abnormal=None, finding=None, body_part=None, boxes=[]))
    model = ModelIdentity.from_predictor(predictor)
    results = build_results(analysis, model)
    *captures, sr = results
    assert [c.SOPClassUID for c in captures] == [SC_CLASS, SC_CLASS] and sr.SOPClassUID == SR_CLASS

    # Round trip through bytes, read back with highdicom.
    sr_read = hd.sr.srread(io.BytesIO(part10(sr)))
    assert sr_read.PatientID == "PID-23" and sr_read.StudyInstanceUID == study
    assert sr_read.SeriesInstanceUID not in (first.SeriesInstanceUID, second.SeriesInstanceUID)
    refs = {str(r.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
            for s in sr_read.CurrentRequestedProcedureEvidenceSequence for r in s.ReferencedSeriesSequence}
    assert refs == {first.SOPInstanceUID, second.SOPInstanceUID}
    rois = sr_read.content.get_planar_roi_measurement_groups()
    assert len(rois) == 1
    assert rois[0].finding_type.value == "72704001"  # fracture
    assert rois[0].roi.graphic_type.value == "POLYLINE"
    np.testing.assert_allclose(rois[0].roi.value, [[10, 20], [50, 20], [50, 70], [10, 70], [10, 20]])
    assert rois[0].roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == first.SOPInstanceUID
    assert [s.value.value for s in rois[0].finding_sites] == ["30021000"]  # leg -> lower leg

    items = _content_items(sr_read)
    verdicts = _codes(items, "121071")  # Finding: study, image a, a's box (fracture), image b
    code = {True: "263654008", False: "17621005"}  # abnormal, normal
    assert verdicts == [code[analysis.study_record["abnormal"]], code[rec_a["abnormal"]], "72704001", "NOT-ASSESSED"]
    texts = _texts(items)
    assert "cannot assess: not a bone radiograph" in texts
    assert any("NOT FOR DIAGNOSTIC USE" in t for t in texts)
    algo = [str(i.TextValue) for i in items if i.ValueType == "TEXT" and i.ConceptNameCodeSequence[0].CodeValue == "111003"]
    assert algo and model.sha[:16] in algo[0]
    probs = [float(i.MeasuredValueSequence[0].NumericValue) for i in items
             if i.ValueType == "NUM" and i.ConceptNameCodeSequence[0].CodeValue == "PROB-ABNORMAL"]
    assert probs == pytest.approx([analysis.study_record["prob_abnormal"], rec_a["prob_abnormal"]], abs=1e-6)

    cap = captures[0]
    assert cap.PatientName == "Test^Bone" and cap.AccessionNumber == "ACC23" and cap.StudyInstanceUID == study
    assert cap.SourceImageSequence[0].ReferencedSOPInstanceUID == first.SOPInstanceUID
    px = cap.pixel_array
    assert px.shape == (120, 96, 3)
    red = (px[..., 0] > 200) & (px[..., 1] < 80) & (px[..., 2] < 80)
    assert red[45, 10:12].any() and red[69:71, 30].any()  # the box's left and bottom edges
    assert not red[90:, 60:].any()  # nothing drawn away from the box
    assert "CANNOT ASSESS: not a bone radiograph" in captures[1].ImageComments
    # Same model, same study: the same UIDs (what makes reruns idempotent).
    again = build_results(analysis, model)
    assert [d.SOPInstanceUID for d in again] == [d.SOPInstanceUID for d in results]


def test_non_images_and_corrupt_instances_are_named_and_the_rest_analysed(pacs_model):
    from bonexray.inference.predictor import Predictor
    from bonexray.pacs.analysis import Instance, analyse_study

    study = generate_uid()
    bad = synthetic_cr(study)
    bad.PixelData = bad.PixelData[:100]
    analysis = analyse_study(Predictor(pacs_model, backend="torch"), study,
                             [Instance("pdf", synthetic_pdf(study)), Instance("ct", synthetic_ct(study)),
                              Instance("bad", bad), Instance("good", synthetic_cr(study))])
    assert [n for n, _ in analysis.skipped] == ["pdf", "ct"]
    assert "not a radiograph (CT" in analysis.skipped[1][1]
    assert [n for n, _ in analysis.problems] == ["bad"] and "pixel data" in analysis.problems[0][1]
    assert [i.record["path"] for i in analysis.images] == ["good"]
    assert analysis.radiograph_uids == [bad.SOPInstanceUID, analysis.images[0].dataset.SOPInstanceUID]


def test_dest_must_be_aet_at_host_port():
    from bonexray.errors import BonexrayError
    from bonexray.pacs.listen import Destination

    assert str(Destination.parse("ORTHANC@127.0.0.1:4242")) == "ORTHANC@127.0.0.1:4242"
    for bad in ("ORTHANC", "127.0.0.1:4242", "ORTHANC@host:port", "A" * 17 + "@h:1"):
        with pytest.raises(BonexrayError, match="AET@HOST:PORT"):
            Destination.parse(bad)


# --------------------------------------------------------------------------- against Orthanc


@requires_orthanc
@pytest.mark.slow
def test_analyze_over_dicomweb_stores_sr_and_captures_once(orthanc, pacs_model, capsys, tmp_path):
    study = generate_uid()
    good = [synthetic_cr(study, seed=3), synthetic_cr(study, seed=4, photometric="MONOCHROME2")]
    bad = synthetic_cr(study, seed=5)
    bad.PixelData = bad.PixelData[:100]
    pdf = synthetic_pdf(study)
    for ds in [*good, bad, pdf]:
        orthanc.upload(part10(ds))

    argv = ["pacs", "analyze", "--url", orthanc.dicomweb, "--model", str(pacs_model), "--study", study,
            "--backend", "torch"]
    rc, out, err = _run(argv, capsys)
    assert rc == 1, err  # one corrupt instance
    assert f"instance {bad.SOPInstanceUID}: corrupt or unsupported DICOM pixel data" in err
    assert f"instance {pdf.SOPInstanceUID}: skipped: not a radiograph (DOC, Encapsulated PDF Storage)" in err
    assert "2 image(s) analysed" in out and "stored SR" in out
    assert all(line.startswith("bonexray pacs analyze: ") for line in err.splitlines())

    stored = orthanc.instances(study)
    srs = [d for d in stored if d.SOPClassUID == SR_CLASS]
    scs = [d for d in stored if d.SOPClassUID == SC_CLASS]
    assert len(srs) == 1 and len(scs) == 2 and len(stored) == 7  # 4 sources + SR + 2 SC
    sr = hd.sr.srread(io.BytesIO(part10(srs[0])))
    assert sr.PatientID == "PID-23" and sr.Manufacturer == "bonexray"
    assert "NOT FOR DIAGNOSTIC USE" in sr.SeriesDescription
    refs = {str(r.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
            for s in sr.CurrentRequestedProcedureEvidenceSequence for r in s.ReferencedSeriesSequence}
    assert refs == {d.SOPInstanceUID for d in good}
    sources = {str(s.SourceImageSequence[0].ReferencedSOPInstanceUID) for s in scs}
    assert sources == {d.SOPInstanceUID for d in good}
    new_series = {sr.SeriesInstanceUID, *(s.SeriesInstanceUID for s in scs)}
    assert not new_series & {d.SeriesInstanceUID for d in [*good, bad, pdf]}
    assert all(s.PatientName == "Test^Bone" and s.StudyID == "S23" for s in scs)

    # A rerun stores nothing new.
    rc, out, err = _run(argv, capsys)
    assert rc == 0 and "already analysed" in out and "nothing stored" in out
    assert len(orthanc.instances(study)) == 7


@requires_orthanc
@pytest.mark.slow
@pytest.mark.skipif(not RG3.exists(), reason=f"real DICOM not found at {RG3} (see shared/data/README.md)")
def test_analyze_real_cr_matches_predict_study(orthanc, pacs_model, capsys):
    """The SR's probabilities are those `bonexray predict --study` gives for the same file (one decode path)."""
    from bonexray.predict import run_predict

    orthanc.upload(RG3.read_bytes())
    study = str(pydicom.dcmread(RG3, stop_before_pixels=True).StudyInstanceUID)
    rc, out, err = _run(["pacs", "analyze", "--url", orthanc.dicomweb, "--model", str(pacs_model),
                         "--study", study, "--backend", "torch"], capsys)
    assert rc == 0, err
    stream = io.StringIO()
    assert run_predict(pacs_model, [RG3], study=True, stream=stream, backend="torch") == 0
    image_rec, study_rec = [json.loads(line) for line in stream.getvalue().splitlines()]
    sr = next(d for d in orthanc.instances(study) if d.SOPClassUID == SR_CLASS)
    items = _content_items(sr)
    probs = [float(i.MeasuredValueSequence[0].NumericValue) for i in items
             if i.ValueType == "NUM" and i.ConceptNameCodeSequence[0].CodeValue == "PROB-ABNORMAL"]
    assert probs == pytest.approx([study_rec["prob_abnormal"], image_rec["prob_abnormal"]], abs=1e-6)
    sc = next(d for d in orthanc.instances(study) if d.SOPClassUID == SC_CLASS)
    assert sc.Rows == 1760 and sc.Columns == 1760  # drawn on the full-resolution image


@requires_orthanc
@pytest.mark.slow
def test_study_vanishing_mid_transfer_is_one_line_and_stores_nothing(orthanc, pacs_model, capsys, monkeypatch):
    import requests
    from dicomweb_client import DICOMwebClient

    study = generate_uid()
    for ds in (synthetic_cr(study, seed=6), synthetic_cr(study, seed=7)):
        orthanc.upload(part10(ds))
    original = DICOMwebClient.retrieve_instance

    def delete_then_retrieve(self, *args, **kwargs):
        found = requests.post(f"{orthanc.url}/tools/lookup", data=study, timeout=10).json()
        for hit in found:
            requests.delete(f"{orthanc.url}/studies/{hit['ID']}", timeout=10)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DICOMwebClient, "retrieve_instance", delete_then_retrieve)
    rc, out, err = _run(["pacs", "analyze", "--url", orthanc.dicomweb, "--model", str(pacs_model),
                         "--study", study, "--backend", "torch"], capsys)
    assert rc == 1
    assert "gone from the server while the study was read (404)" in err
    assert "removed from the server while it was read; nothing stored" in err
    assert "Traceback" not in err and out == ""


def test_unreachable_server_is_one_line(pacs_model, capsys):
    url = f"http://127.0.0.1:{free_port()}/dicom-web"  # nothing listens there
    rc, out, err = _run(["pacs", "analyze", "--url", url, "--model", str(pacs_model), "--study", "1.2.3"], capsys)
    assert rc == 2
    assert err.count("\n") == 1 and "cannot reach the server" in err and url in err


@requires_orthanc
@pytest.mark.slow
def test_401_is_one_line(tmp_path, pacs_model, capsys):
    server = Orthanc(tmp_path / "orthanc-auth", users={"alice": "s3cret"})
    try:
        base = ["pacs", "analyze", "--url", server.dicomweb, "--model", str(pacs_model), "--modality", "CR"]
        rc, out, err = _run(base, capsys)
        assert rc == 2 and err.count("\n") == 1 and "401 Unauthorized" in err and "--user" in err
        rc, out, err = _run([*base, "--user", "alice", "--password", "s3cret"], capsys)
        assert rc == 0 and "no study" in out  # the right user gets in (the server is empty)
    finally:
        server.close()


@requires_orthanc
@pytest.mark.slow
def test_listen_analyses_a_pushed_study_and_stores_results_in_orthanc(orthanc, pacs_model, listener_port, capsys):
    from pynetdicom import AE
    from pynetdicom.sop_class import ComputedRadiographyImageStorage, EncapsulatedPDFStorage

    from bonexray.inference.predictor import Predictor
    from bonexray.pacs.listen import Destination, Listener

    listener = Listener(Predictor(pacs_model, backend="torch"),
                        Destination("ORTHANC", "127.0.0.1", orthanc.dicom_port), listener_port,
                        quiet_seconds=1.0).start()
    try:
        study = generate_uid()
        pushed = [synthetic_cr(study, seed=8), synthetic_cr(study, seed=9), synthetic_pdf(study)]
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)
        ae.add_requested_context(EncapsulatedPDFStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", listener_port, ae_title="BONEXRAY")
        assert assoc.is_established
        for ds in pushed:
            assert assoc.send_c_store(ds).Status == 0x0000
        assoc.release()
        for _ in range(600):  # the quiet period, then analysis and C-STORE to Orthanc
            if listener.studies_done:
                break
            time.sleep(0.1)
        assert listener.studies_done == 1
    finally:
        listener.stop()
    out, err = capsys.readouterr()
    assert "2 image(s) analysed; sent SR" in out, err
    assert f"instance {pushed[2].SOPInstanceUID}: skipped: not a radiograph" in err
    stored = orthanc.instances(study)  # only results are in Orthanc: the sources went to bonexray
    srs = [d for d in stored if d.SOPClassUID == SR_CLASS]
    scs = [d for d in stored if d.SOPClassUID == SC_CLASS]
    assert len(srs) == 1 and len(scs) == 2 and len(stored) == 3
    sr = hd.sr.srread(io.BytesIO(part10(srs[0])))
    refs = {str(r.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
            for s in sr.CurrentRequestedProcedureEvidenceSequence for r in s.ReferencedSeriesSequence}
    assert refs == {d.SOPInstanceUID for d in pushed[:2]}
    assert sr.PatientID == "PID-23" and sr.StudyInstanceUID == study



@pytest.mark.slow
def test_listen_command_stops_cleanly_on_sigterm(pacs_model, tmp_path):
    """`bonexray pacs listen` as a service: it says where it listens, and SIGTERM ends it with status 0."""
    import os
    import signal
    import sys

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "bonexray.cli", "pacs", "listen", "--model", str(pacs_model),
                             "--port", str(port), "--dest", "ORTHANC@127.0.0.1:1", "--backend", "torch"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        first = proc.stdout.readline()
        assert f"listening on 127.0.0.1:{port}" in first, first
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, rest
    assert "stopping (SIGTERM)" in rest and "Traceback" not in rest
