"""Ceilings on what reading a bundle may write or load, whatever its manifest declares.

A bundle holds one transformer (FP32 and INT8, a few hundred MiB at most for the models deploykit
ships), its engines and the verification arrays; these leave room for models up to about 2 GiB
(ONNX's protobuf limit without external data) and refuse a decompression bomb long before a disk
fills. The readers look them up here when they run (``limits.MAX_MEMBERS``), so one assignment
lowers a ceiling for every check.
"""

MAX_MEMBER_BYTES = 4 * 2**30        # one file of the bundle
MAX_TOTAL_BYTES = 8 * 2**30         # all its files together
MAX_MEMBERS = 10_000                # archive entries (files and folders)
MAX_MANIFEST_BYTES = 16 * 2**20     # manifest.json, read into memory
