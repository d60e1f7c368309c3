"""Which config changes a checkpoint refuses and which it applies (soft.checkpointing.compatibility)."""

from __future__ import annotations

import pytest
import yaml

from soft.checkpointing import compatibility as c
from soft.checkpointing.directory import CONFIG, CheckpointError
from soft.config.core import describe, flatten, to_dict
from soft.config.root import RootConfig, load_config


def test_every_config_key_is_classified():
    """A new config key must be placed: ARCHITECTURE, RUN, STARTING_POINT, BY_IDENTITY, or
    APPLIED (may change on resume). Keys in two classes or in none fail here."""
    keys = {row[0] for row in describe(RootConfig)}
    classes = [c.ARCHITECTURE, c.RUN, c.STARTING_POINT, c.BY_IDENTITY, c.APPLIED]
    placed = [k for cls in classes for k in cls]
    assert len(placed) == len(set(placed)), "a key is in two classes"
    assert set(placed) == keys, (sorted(keys - set(placed)), sorted(set(placed) - keys))


def _saved(tmp_path, *overrides):
    ckpt = tmp_path / "iter_0000004"
    ckpt.mkdir()
    (ckpt / CONFIG).write_text(yaml.safe_dump(to_dict(load_config(None, list(overrides)))))
    return ckpt


def _request(*overrides):
    return flatten(to_dict(load_config(None, list(overrides))))


def test_a_changed_architecture_is_refused_on_resume_and_on_weights_loads(tmp_path):
    """8 heads reading a 4-head checkpoint: QKV has the same shape, the meaning is different."""
    ckpt = _saved(tmp_path)
    request = _request("model.num_attention_heads=8")
    with pytest.raises(CheckpointError, match=r"model.num_attention_heads: 4 -> 8"):
        c.check_resume(ckpt, request, None)
    with pytest.raises(CheckpointError, match=r"model.num_attention_heads: 4 -> 8"):
        c.check_weights_load(ckpt, request, None, extract=False)


def test_a_different_run_is_refused_on_resume_with_both_values(tmp_path):
    ckpt = _saved(tmp_path)
    request = _request("soft.exit_layers=[2,4]", "train.seed=7")
    with pytest.raises(CheckpointError) as err:
        c.check_resume(ckpt, request, None)
    assert "soft.exit_layers: [1, 2, 3, 4] -> [2, 4]" in str(err.value)
    assert "train.seed: 42 -> 7" in str(err.value) and "new train.output_dir" in str(err.value)
    # ... but a fine-tuning load of its weights may use any exit plan and seed:
    c.check_weights_load(ckpt, request, None, extract=False)


def test_equal_meanings_spelled_differently_are_equal(tmp_path):
    """null exit layers = every layer; null query groups = one per head; weights normalised."""
    ckpt = _saved(tmp_path)
    request = _request(
        "soft.exit_layers=[1,2,3,4]", "soft.exit_weights=[2,2,2,2]", "model.num_query_groups=4"
    )
    assert c.check_resume(ckpt, request, None) == []


def test_settings_that_may_change_are_returned_to_apply(tmp_path):
    ckpt = _saved(tmp_path, "train.lr=1e-3")
    changes = c.check_resume(
        ckpt,
        _request(
            "train.lr=5e-4", "train.train_iters=120", "parallel.pipeline_model_parallel_size=2"
        ),
        None,
    )
    assert {str(x) for x in changes} == {
        "train.lr: 0.001 -> 0.0005",
        "train.train_iters: 60 -> 120",
        "parallel.pipeline_model_parallel_size: 1 -> 2",
    }


def test_a_deeper_checkpoint_suggests_the_extracted_mode(tmp_path):
    ckpt = _saved(tmp_path, "model.num_layers=8")
    with pytest.raises(CheckpointError, match="set soft.mode=extracted"):
        c.check_weights_load(ckpt, _request(), None, extract=False)
    c.check_weights_load(ckpt, _request(), None, extract=True)


def test_another_tokenizer_is_refused_by_checksum(tmp_path):
    from soft.checkpointing import manifest

    ckpt = _saved(tmp_path)
    ours = {"sha256": "a" * 64, "vocab_size": 512, "path": "/x/tokenizer.model"}
    manifest.write_manifest(ckpt, {}, 4, {"tokenizer": ours})
    c.check_resume(ckpt, _request(), {**ours, "path": "/moved/tokenizer.model"})  # same file
    other = {"sha256": "b" * 64, "vocab_size": 1000, "path": "/y/tokenizer.model"}
    with pytest.raises(CheckpointError, match="another tokenizer.*512 pieces.*1000 pieces"):
        c.check_weights_load(ckpt, _request(), other, extract=False)


def test_the_tokenizer_kind_is_compared_with_its_checksum(tmp_path):
    """The same checksum under another kind is another tokenizer; identities recorded before
    kinds existed are SentencePiece ones; an import accepts every form it came with."""
    from soft.checkpointing import manifest

    ckpt = _saved(tmp_path)
    sp = {"sha256": "a" * 64, "vocab_size": 512, "path": "/x/tokenizer.model"}  # no kind: old
    manifest.write_manifest(ckpt, {}, 4, {"tokenizer": sp})
    c.check_resume(ckpt, _request(), {**sp, "kind": "sentencepiece"})
    hf = {"kind": "hf", "sha256": "a" * 64, "vocab_size": 512, "path": "/x"}
    with pytest.raises(
        CheckpointError,
        match=r"another tokenizer: /x/tokenizer.model \(sentencepiece, 512 pieces, sha256 "
        r"aaaaaaaaaaaa\) there, /x \(hf, 512 pieces, sha256 aaaaaaaaaaaa\) in this run",
    ):
        c.check_resume(ckpt, _request(), hf)

    imported = tmp_path / "import" / "iter_0000000"
    imported.mkdir(parents=True)
    (imported / CONFIG).write_text((ckpt / CONFIG).read_text())
    hf_form = {**hf, "sha256": "c" * 64}
    manifest.write_manifest(imported, {}, 0, {"tokenizer": sp, "tokenizer_forms": [hf_form]})
    c.check_weights_load(imported, _request(), {**hf_form, "path": "/moved"}, extract=False)
    with pytest.raises(CheckpointError, match=r"another tokenizer"):
        c.check_weights_load(imported, _request(), {**hf_form, "sha256": "d" * 64}, extract=False)
