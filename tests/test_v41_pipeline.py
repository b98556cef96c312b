"""V4.1 in pipeline mode: 2 and 3 processes over the ring backend give one process's logits and
tokens when the stages start where no layer reads an earlier stage's pools; other cuts are
refused. The harness (launch, run_rank0) is test_pipeline's."""

import numpy as np
import pytest

from test_pipeline import launch, run_rank0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from mlx_dsv4.convert import convert
    from mlx_dsv4.synthetic import tiny_v41_config, write_official_checkpoint

    root = tmp_path_factory.mktemp("pipe41")
    src = write_official_checkpoint(root / "src", tiny_v41_config(), shards=2)
    convert(src, root / "m", recipe="native")
    return root / "m"


@pytest.fixture(scope="module")
def reference(model_dir, tmp_path_factory):
    from mlx_dsv4.model.weights import load_model

    out = tmp_path_factory.mktemp("ref41") / "ref.npz"
    run_rank0(load_model(model_dir), out)
    return dict(np.load(out))


@pytest.mark.parametrize("splits", [[0, 4, 7], [0, 2, 4, 7]], ids=["2-ranks", "3-ranks"])
def test_ranks_match_one_process(model_dir, reference, splits, tmp_path):
    launch(model_dir, tmp_path / "out.npz", splits, tmp_path)
    got = np.load(tmp_path / "out.npz")
    assert got["compiled"] and reference["compiled"]
    for name in ("logits", "batch", "decode"):
        np.testing.assert_array_equal(got[name], reference[name], err_msg=name)
    np.testing.assert_array_equal(got["tokens"], reference["tokens"])
    np.testing.assert_array_equal(got["again"], reference["tokens"])


def test_cuts_inside_a_pool_group_are_refused(model_dir):
    from mlx_dsv4.config import ModelArgs
    from mlx_dsv4.plan import PlanError, pipeline_split

    args = ModelArgs.from_file(model_dir)
    assert args.pipeline_cuts() == {1, 2, 4}
    assert all(r.start in {0, 1, 2, 4} for r in pipeline_split(model_dir, [1 << 30] * 3))
    with pytest.raises(PlanError, match=r"cut only at \[1, 2, 4\], so a pipeline has at most 4 stages"):
        pipeline_split(model_dir, [1 << 30] * 5)


def test_load_refuses_a_cut_that_separates_a_reader_from_its_pool(model_dir):
    from mlx_dsv4.model.pipeline import PipelineError
    from mlx_dsv4.model.weights import load_pipeline

    class Group:
        def size(self):
            return 2

        def rank(self):
            return 1

    with pytest.raises(PipelineError, match="cannot start at layer 3"):
        load_pipeline(model_dir, Group(), [range(0, 3), range(3, 7)])
