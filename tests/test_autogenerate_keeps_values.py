"""Autogenerate keeps trained values: split/concat, rename + resize, names over shapes.

The story of the issue: model v1 has a fused ``nn.MultiheadAttention`` and an
``lm_head`` over 100 tokens; v2 has separate q/k/v/o projections and an
``out`` head over 128 tokens. The generated revision must carry every trained
value across, and whatever a revision does discard must be marked, reported
and caught by ``check``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tests.conftest import Run, init_with_model

MODELS = """
import math

import torch
from torch import nn

VOCAB, DIM, HEADS = 100, 16, 4


class Fused(nn.Module):
    '''v1: one MultiheadAttention, an lm_head over 100 tokens.'''

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.attn = nn.MultiheadAttention(DIM, HEADS)
        self.lm_head = nn.Linear(DIM, VOCAB)

    def attention(self, tokens):
        x = self.embed(tokens)
        return self.attn(x, x, x, need_weights=False)[0]

    def forward(self, tokens):
        return self.lm_head(self.attention(tokens))


class Split(nn.Module):
    '''v2: separate q, k, v, o projections; an `out` head over 128 tokens.'''

    def __init__(self, vocab=128):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.q = nn.Linear(DIM, DIM)
        self.k = nn.Linear(DIM, DIM)
        self.v = nn.Linear(DIM, DIM)
        self.o = nn.Linear(DIM, DIM)
        self.out = nn.Linear(DIM, vocab)

    def attention(self, tokens):
        x = self.embed(tokens)  # [L, N, E], like MultiheadAttention's default layout
        length, batch, _ = x.shape

        def heads(t):
            return t.reshape(length, batch * HEADS, DIM // HEADS).transpose(0, 1)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        weights = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(DIM // HEADS), dim=-1)
        mixed = (weights @ v).transpose(0, 1).reshape(length, batch, DIM)
        return self.o(mixed)

    def forward(self, tokens):
        return self.out(self.attention(tokens))


class NoAttention(nn.Module):
    '''v1 without its attention: trained values thrown away.'''

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.lm_head = nn.Linear(DIM, VOCAB)


class SmallVocab(Fused):
    '''v1 with a head over 80 tokens: 20 trained rows cut.'''

    def __init__(self):
        super().__init__()
        self.lm_head = nn.Linear(DIM, 80)


class Numbered(nn.Module):
    '''v2 with projections whose names say nothing about their role.'''

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.lin0, self.lin1, self.lin2, self.lin3 = (nn.Linear(DIM, DIM) for _ in range(4))
        self.lm_head = nn.Linear(DIM, VOCAB)


VARIANTS = {
    "fused": Fused,
    "split": Split,
    "noattn": NoAttention,
    "small": SmallVocab,
    "numbered": Numbered,
}
"""


def _use(root: Path, variant: str) -> None:
    """models.py whose build() returns the named variant."""
    build = f"\n\ndef build():\n    return VARIANTS[{variant!r}]()\n"
    (root / "models.py").write_text(MODELS + build)
    sys.modules.pop("models", None)


def _models() -> object:
    sys.modules.pop("models", None)
    import models

    return models


Start = Callable[[str, str], Path]


@pytest.fixture
def start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run: Run) -> Start:
    """start(variant, rev): a lineage whose base is that model, as a new user starts one."""

    def _start(variant: str, rev: str) -> Path:
        init_with_model(tmp_path, monkeypatch, run)
        _use(tmp_path, variant)
        run("revision", "--autogenerate", "-m", "initial", "--rev-id", rev)
        return tmp_path

    return _start


@pytest.fixture
def fused(start: Start) -> Path:
    return start("fused", "a0000001")


def _text(root: Path, rev: str) -> str:
    (path,) = (root / "migrations/versions").glob(f"{rev}_*.py")
    return path.read_text()


def _body(text: str, fn: str) -> list[str]:
    """The op lines of upgrade() or downgrade()."""
    part = text.split(f"def {fn}() -> None:")[1].split("\ndef ")[0]
    return [line.strip() for line in part.splitlines() if line.strip().startswith("op.")]


def test_split_rename_and_wider_vocabulary_keep_every_trained_value(fused: Path, run: Run) -> None:
    _use(fused, "split")
    result = run("revision", "--autogenerate", "-m", "split attention", "--rev-id", "a0000002")
    assert "discards" not in result.stderr
    assert "Review the 6 lines marked '# review:'" in result.stderr
    text = _text(fused, "a0000002")
    up = _body(text, "upgrade")
    assert [line.split("  # review:")[0] for line in up] == [
        'op.rename_prefix("attn.out_proj.", "o.")',
        'op.split("attn.in_proj_weight", into=["q.weight", "k.weight", "v.weight"])',
        'op.split("attn.in_proj_bias", into=["q.bias", "k.bias", "v.bias"])',
        'op.rename_prefix("lm_head.", "out.")',
        'op.resize("out.weight", (128, 16))',
        'op.resize("out.bias", (128,))',
    ]
    assert all("  # review: " in line for line in up)
    assert "parts ordered q, k, v" in up[1]
    assert "new entries start at zeros" in up[4]
    down = _body(text, "downgrade")
    assert [line.split("  # review:")[0] for line in down] == [
        'op.resize("out.bias", (100,))',
        'op.resize("out.weight", (100, 16))',
        'op.rename_prefix("out.", "lm_head.")',
        'op.concat(["q.bias", "k.bias", "v.bias"], into="attn.in_proj_bias")',
        'op.concat(["q.weight", "k.weight", "v.weight"], into="attn.in_proj_weight")',
        'op.rename_prefix("o.", "attn.out_proj.")',
    ]
    check = run("check")
    assert "discard" not in check.stdout.replace("no upgrade() discards", "")

    models = _models()
    torch.manual_seed(0)
    v1 = models.Fused().eval()  # type: ignore[attr-defined]
    before = {k: t.clone() for k, t in v1.state_dict().items()}
    torch.save(v1.state_dict(), "v1.pth")
    run("upgrade", "v1.pth", "-o", "v2.pth")
    v2 = models.Split().eval()  # type: ignore[attr-defined]
    v2.load_state_dict(torch.load("v2.pth", weights_only=True), strict=True)

    w, b = before["attn.in_proj_weight"], before["attn.in_proj_bias"]
    for i, name in enumerate("qkv"):
        assert torch.equal(getattr(v2, name).weight, w[16 * i : 16 * (i + 1)])
        assert torch.equal(getattr(v2, name).bias, b[16 * i : 16 * (i + 1)])
    assert torch.equal(v2.o.weight, before["attn.out_proj.weight"])
    assert torch.equal(v2.out.weight[:100], before["lm_head.weight"])
    assert torch.equal(v2.out.bias[:100], before["lm_head.bias"])
    assert not v2.out.weight[100:].any() and not v2.out.bias[100:].any()

    tokens = torch.randint(0, 100, (7, 3))
    with torch.no_grad():
        torch.testing.assert_close(v2.attention(tokens), v1.attention(tokens))
        logits_v1, logits_v2 = v1(tokens), v2(tokens)
    torch.testing.assert_close(logits_v2[..., :100], logits_v1)
    assert not logits_v2[..., 100:].any()

    # and back: the downgrade gives the v1 file bit for bit
    run("downgrade", "v2.pth", "a0000001", "-o", "back.pth")
    back = torch.load("back.pth", weights_only=True)
    assert sorted(back) == sorted(before)
    assert all(torch.equal(back[k], before[k]) for k in before)


def test_separate_projections_fuse_back_into_multihead_attention(start: Start, run: Run) -> None:
    """The other direction: q/k/v concatenated, o renamed, the vocabulary cut (reported)."""
    tmp_path = start("split", "b0000001")
    _use(tmp_path, "fused")
    result = run("revision", "--autogenerate", "-m", "fuse", "--rev-id", "b0000002")
    up = _body(_text(tmp_path, "b0000002"), "upgrade")
    assert 'op.concat(["q.weight", "k.weight", "v.weight"], into="attn.in_proj_weight")' in (
        "\n".join(up)
    )
    assert 'op.concat(["q.bias", "k.bias", "v.bias"], into="attn.in_proj_bias")' in "\n".join(up)
    assert any(line.startswith('op.rename_prefix("o.", "attn.out_proj.")') for line in up)
    assert any(line.startswith('op.rename_prefix("out.", "lm_head.")') for line in up)
    assert not any(line.startswith(("op.drop", "op.add")) for line in up)
    # 128 -> 100 tokens: the cut rows are trained values, and said so
    assert (
        "Warning: this revision discards trained values: out.weight [128, 16] (cut to [100, 16]: "
        "448 values), out.bias [128] (cut to [100]: 28 values)" in result.stderr
    )

    models = _models()
    torch.manual_seed(1)
    v2 = models.Split().eval()  # type: ignore[attr-defined]
    torch.save(v2.state_dict(), "v2.pth")
    run("upgrade", "v2.pth", "-o", "v1.pth")
    v1 = models.Fused().eval()  # type: ignore[attr-defined]
    v1.load_state_dict(torch.load("v1.pth", weights_only=True), strict=True)
    tokens = torch.randint(0, 100, (5, 2))
    with torch.no_grad():
        torch.testing.assert_close(v1.attention(tokens), v2.attention(tokens))
        torch.testing.assert_close(v1(tokens), v2(tokens)[..., :100])


def test_drops_are_marked_counted_reported_and_fail_check(fused: Path, run: Run) -> None:
    _use(fused, "noattn")
    result = run("revision", "--autogenerate", "-m", "no attention", "--rev-id", "a0000002")
    up = _body(_text(fused, "a0000002"), "upgrade")
    assert up == [
        'op.drop_prefix("attn.")  # review: discards trained values: 4 tensors, 1,088 values'
    ]
    assert "Review the 1 line marked '# review:'" in result.stderr
    assert (
        "Warning: this revision discards trained values: "
        "attn.in_proj_weight [48, 16] (768 values), attn.in_proj_bias [48] (48 values), "
        "attn.out_proj.weight [16, 16] (256 values), attn.out_proj.bias [16] (16 values)"
        in result.stderr
    )
    assert "intended=True" in result.stderr  # how to acknowledge it

    check = run("check", code=1)
    assert (
        "Discards trained values in a0000002 (migrations/versions/a0000002_no_attention.py): "
        "attn.in_proj_weight [48, 16] (768 values)" in check.stdout
    )
    assert check.stderr.startswith("Error: ")
    assert "1 revision discards trained values without intended=True: a0000002" in check.stderr

    # the user reviews it and says so: check passes and still mentions it
    path = next((fused / "migrations/versions").glob("a0000002_*.py"))
    path.write_text(
        path.read_text().replace(
            'op.drop_prefix("attn.")', 'op.drop_prefix("attn.", intended=True)'
        )
    )
    check = run("check")
    assert "OK: no upgrade() discards trained values unless marked intended" in check.stdout
    assert "a0000002 discards 4 tensors (1,088 values), marked intended" in check.stdout

    # the marked drop runs like the plain one
    models = _models()
    torch.save(models.Fused().state_dict(), "v1.pth")  # type: ignore[attr-defined]
    run("upgrade", "v1.pth")
    models.NoAttention().load_state_dict(  # type: ignore[attr-defined]
        torch.load("v1.pth", weights_only=True), strict=True
    )


def test_shrinking_resize_is_a_discard_unless_intended(fused: Path, run: Run) -> None:
    _use(fused, "small")
    # -q silences notes, not this warning
    result = run("-q", "revision", "--autogenerate", "-m", "small vocab", "--rev-id", "a0000002")
    up = _body(_text(fused, "a0000002"), "upgrade")
    assert up[0].startswith(
        'op.resize("lm_head.weight", (80, 16))  # review: shape changed from [100, 16]; '
        "discards 320 trained values"
    )
    assert "lm_head.weight [100, 16] (cut to [80, 16]: 320 values)" in result.stderr
    check = run("check", "--no-roundtrip", code=1)
    assert "lm_head.bias [100] (cut to [80]: 20 values)" in check.stdout
    path = next((fused / "migrations/versions").glob("a0000002_*.py"))
    up_text, down_text = path.read_text().split("def downgrade")
    for old in ('op.resize("lm_head.weight", (80, 16))', 'op.resize("lm_head.bias", (80,))'):
        assert old in up_text
        up_text = up_text.replace(old, old[:-1] + ", intended=True)")
    path.write_text(up_text + "def downgrade" + down_text)
    assert "marked intended" in run("check").stdout


def test_check_finds_values_lost_by_hand_written_scripts(fused: Path, run: Run) -> None:
    """A split whose part is dropped, and a drop of a renamed key: both lose trained values.

    A drop marked intended in the same revision is not among them.
    """
    run("revision", "-m", "lossy", "--rev-id", "a0000002")
    path = fused / "migrations/versions/a0000002_lossy.py"
    path.write_text(
        path.read_text()
        .replace(
            "def upgrade() -> None:\n    pass",
            "def upgrade() -> None:\n"
            '    op.split("attn.in_proj_weight", into=["q", "k", "v"])\n'
            '    op.drop_key("v")\n'
            '    op.rename_key("lm_head.bias", "bias")\n'
            '    op.drop_key("bias")\n'
            '    op.add_tensor("new", (3,))\n'
            '    op.drop_key("new")\n'
            '    op.drop_key("attn.out_proj.bias", intended=True)\n',
        )
        .replace(
            "def downgrade() -> None:\n    pass",
            "def downgrade() -> None:\n"
            '    op.add_tensor("attn.out_proj.bias", (16,))\n'
            '    op.add_tensor("lm_head.bias", (100,))\n'
            '    op.add_tensor("v", (16, 16))\n'
            '    op.concat(["q", "k", "v"], into="attn.in_proj_weight")\n',
        )
    )
    check = run("check", code=1)
    line = next(x for x in check.stdout.splitlines() if x.startswith("Discards"))
    assert line.endswith(
        "attn.in_proj_weight [48, 16] (part not kept: 256 values), lm_head.bias [100] (100 values)"
    )
    assert "new" not in line  # created and dropped in the same step: nothing trained
    assert "OK: downgrade() undoes upgrade()" in check.stdout

    path.write_text(path.read_text().replace('op.drop_key("v")', 'op.drop_key("v", intended="y")'))
    check = run("check", code=1)
    assert "drop_key('v', intended='y'): intended= is True or False, not 'y'" in check.stderr


def test_rename_guesses_weigh_names_and_names_that_cannot_tell_get_no_guess(
    fused: Path, run: Run
) -> None:
    """out_proj pairs with o, not with the first same-shape key; lin0..lin3 get no coin toss."""
    models = _models()
    torch.save(models.Fused().state_dict(), "v1.pth")  # type: ignore[attr-defined]

    def renames() -> set[str]:
        out = run("diff", "v1.pth").stdout
        return {line.strip() for line in out.splitlines() if "likely rename" in line}

    _use(fused, "split")
    assert renames() == {
        "likely rename: attn.out_proj.weight -> o.weight (same shape and dtype)",
        "likely rename: attn.out_proj.bias -> o.bias (same shape and dtype)",
    }
    _use(fused, "numbered")
    assert renames() == set()
    # autogenerate does not guess either: it drops, and says what that discards
    result = run("revision", "--autogenerate", "-m", "numbered", "--rev-id", "a0000002")
    up = _body(_text(fused, "a0000002"), "upgrade")
    assert up[0] == (
        'op.drop_prefix("attn.")  # review: discards trained values: 4 tensors, 1,088 values'
    )
    assert not any("rename" in line or "split" in line for line in up)
    assert "Warning: this revision discards trained values: attn.in_proj_weight" in result.stderr


def test_check_pluralises_the_round_trip_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run: Run
) -> None:
    init_with_model(tmp_path, monkeypatch, run)
    _use(tmp_path, "fused")
    run("schema", "--record")
    assert run("check").stdout.splitlines()[1:] == [
        "OK: no revisions yet, so no round trip to check"
    ]
    run("revision", "--autogenerate", "-m", "initial", "--allow-empty")
    assert run("check").stdout.splitlines()[1:] == [
        "OK: downgrade() undoes upgrade() in the 1 revision",
        "OK: no upgrade() discards trained values",
    ]
