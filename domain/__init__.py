"""The domain: what the audit log records and the rules it follows, as pure functions and types.

Events (msgspec Structs in one tagged union, with schema versions and upcasters), the rules of a
stream, the hash chain, the Merkle tree and the C2SP checkpoint formats, what a valid upload is, preprocessing
(bytes → tensor with Pillow and numpy), the model port, what a prediction records, and the one
refusal type (`Rejected`, with a code). No I/O: imports nothing of ours outside `domain`, and no
database driver, web framework or TensorFlow (tests/unit/test_structure.py holds it to that).
"""
