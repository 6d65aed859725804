"""``bonexray pacs``: studies from a PACS in, DICOM results (Comprehensive SR + secondary captures) back.

* :mod:`analysis`: one study's instances -> predict's records (the decode and predict path of ``predict --study``).
* :mod:`results`: records -> highdicom SR (TID 1500) and SCImage per image, deterministic UIDs.
* :mod:`dicomweb`: ``pacs analyze`` over QIDO/WADO/STOW-RS (dicomweb-client).
* :mod:`listen`: ``pacs listen``, a C-STORE receiver that sends results on by C-STORE (pynetdicom).
"""
