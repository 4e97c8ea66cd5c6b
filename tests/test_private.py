"""The private API of other libraries that nanogpt uses is only trusted on the releases it was tested on."""

from nanogpt import private
from nanogpt.private import TESTED_LIGHTNING_VERSIONS, is_tested_lightning


def test_the_installed_lightning_is_a_tested_release():
    import lightning

    # a new release may move what nanogpt/private.py reaches into: run the suite on it (the DDP, resume
    # and signal tests exercise every site), then add it to TESTED_LIGHTNING_VERSIONS and setup.cfg's range
    assert is_tested_lightning(), (
        f"lightning {lightning.__version__} is not a release nanogpt/private.py was tested on "
        f"({', '.join(TESTED_LIGHTNING_VERSIONS)})"
    )
    assert not is_tested_lightning("2.6.3")  # one of the malicious releases: never in the list


def test_each_private_use_still_reaches_what_it_needs(tmp_path):
    # the releases of numpy, datasets and TensorBoard are not pinned (a fresh install takes the newest): this test,
    # not a version list, is what fails when one of them moves what nanogpt reaches into
    import numpy as np

    path = tmp_path / "tokens.bin"
    np.arange(16, dtype=np.uint8).tofile(path)
    assert private.memmap_buffer(np.memmap(path, dtype=np.uint8, mode="r")) is not None  # an mmap.mmap to advise
    import datasets

    a, b = datasets.Dataset.from_dict({"text": ["a"]}), datasets.Dataset.from_dict({"text": ["b"]})
    assert private.dataset_fingerprint(a) != private.dataset_fingerprint(b)
    summary = private.text_pb("val/sample", "hello")
    assert summary.value[0].tag == "val/sample"  # exactly the tag given
