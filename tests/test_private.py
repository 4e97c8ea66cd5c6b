"""The private Lightning API nanogpt uses is only trusted on the Lightning releases it was tested on."""

import lightning

from nanogpt.private import TESTED_LIGHTNING_VERSIONS, is_tested_lightning


def test_the_installed_lightning_is_a_tested_release():
    # a new release may move what nanogpt/private.py reaches into: run the suite on it (the DDP, resume
    # and signal tests exercise every site), then add it to TESTED_LIGHTNING_VERSIONS and setup.cfg's range
    assert is_tested_lightning(), (
        f"lightning {lightning.__version__} is not a release nanogpt/private.py was tested on "
        f"({', '.join(TESTED_LIGHTNING_VERSIONS)})"
    )
    assert not is_tested_lightning("2.6.3")  # one of the malicious releases: never in the list
