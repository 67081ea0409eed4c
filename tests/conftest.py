import pytest


@pytest.fixture(scope="session")
def small_broden(tmp_path_factory):
    """A generated Broden-format dataset (40 images, 96 px, 48 px labels) shared by the
    session. Usable as a path; ``.truth[i]`` is what the generator drew for row i.
    Tests that modify the dataset must copy it first."""
    from netdissect_fast.datasets import make_broden
    return make_broden(tmp_path_factory.mktemp("broden") / "small", 40, seed=1, size=96,
                       workers=1, keep_truth=True)
