"""Tests of the shared dataclasses (prefopt.types): validation, upcasting, finiteness checks."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from prefopt.types import (
    LossOutput,
    PairBatch,
    PairLogps,
    UnpairedLogps,
    check_finite,
    check_tensor,
    unpack_pair_batch,
)

Z = torch.zeros(3)


def test_check_tensor():
    assert check_tensor("x", Z, ndim=1) is Z
    with pytest.raises(TypeError, match=r"x must be a torch\.Tensor, got list"):
        check_tensor("x", [0.0])
    with pytest.raises(ValueError, match=r"x must have 2 dimension\(s\), got shape \(3,\)"):
        check_tensor("x", Z, ndim=2)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        check_tensor("x", torch.zeros(3, dtype=torch.long))
    check_tensor("n", torch.zeros(3, dtype=torch.long), floating=False)


def test_check_finite():
    check_finite("x", None)
    check_finite("x", Z)
    check_finite("n", torch.tensor([1, 2]))  # integer tensors are always finite
    with pytest.raises(ValueError, match=r"x has 2 non-finite value\(s\)"):
        check_finite("x", torch.tensor([0.0, float("nan"), float("-inf")]))


def test_pair_logps_valid_and_properties():
    p = PairLogps(Z, Z)
    assert not p.has_reference and not p.has_lengths
    q = PairLogps(Z, Z, Z, Z, torch.tensor([1, 2, 3]), torch.tensor([1, 1, 1]))
    assert q.has_reference and q.has_lengths
    with pytest.raises(dataclasses.FrozenInstanceError):
        q.chosen = Z  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "exc", "name"),
    [
        ({"chosen": torch.zeros(3, 1), "rejected": Z}, ValueError, "chosen"),
        ({"chosen": [0.0], "rejected": Z}, TypeError, "chosen"),
        ({"chosen": Z, "rejected": torch.zeros(4)}, ValueError, "rejected"),
        (
            {"chosen": Z, "rejected": Z, "ref_chosen": Z, "ref_rejected": torch.zeros(2)},
            ValueError,
            "ref_rejected",
        ),
        ({"chosen": Z, "rejected": Z, "ref_chosen": Z}, ValueError, "ref_chosen and ref_rejected"),
        (
            {"chosen": Z, "rejected": Z, "chosen_len": torch.ones(3)},
            ValueError,
            "chosen_len and rejected_len",
        ),
        ({"chosen": Z, "rejected": torch.zeros(3, dtype=torch.long)}, TypeError, "rejected"),
        (
            {"chosen": Z, "rejected": Z, "chosen_len": torch.ones(2), "rejected_len": torch.ones(3)},
            ValueError,
            "chosen_len",
        ),
    ],
)
def test_pair_logps_bad_input_named(kwargs, exc, name):
    with pytest.raises(exc, match=name):
        PairLogps(**kwargs)


def test_pair_logps_upcast():
    bf = torch.tensor([-1.5, -2.0, -3.25], dtype=torch.bfloat16, requires_grad=True)
    p = PairLogps(bf, bf, bf, bf, torch.tensor([1, 2, 3]), torch.tensor([3, 2, 1]))
    u = p.upcast()
    assert u.chosen.dtype == torch.float32 and u.ref_rejected.dtype == torch.float32
    assert u.chosen_len.dtype == torch.float32 and u.chosen_len.tolist() == [1.0, 2.0, 3.0]
    u.chosen.sum().backward()  # differentiable back to the bf16 leaf
    assert bf.grad is not None and bf.grad.dtype == torch.bfloat16
    f64 = PairLogps(
        Z.double(), Z.double(), chosen_len=torch.tensor([1, 2, 3]), rejected_len=torch.tensor([1, 2, 3])
    )
    u64 = f64.upcast()
    assert u64.chosen.dtype == torch.float64 and u64.chosen_len.dtype == torch.float64
    f32 = PairLogps(Z, Z)
    assert f32.upcast().chosen is Z  # float32 is kept as is
    fp16 = PairLogps(Z.half(), Z.half())
    assert fp16.upcast().rejected.dtype == torch.float32


def test_pair_logps_check_finite_names_first_bad_field():
    bad = torch.tensor([0.0, float("inf"), 0.0])
    PairLogps(Z, Z, Z, Z).check_finite()
    with pytest.raises(ValueError, match="ref_rejected"):
        PairLogps(Z, Z, Z, bad).check_finite()
    with pytest.raises(ValueError, match=r"^rejected"):
        PairLogps(Z, bad, Z, bad).check_finite()


def test_unpaired_logps_valid_and_bad():
    d = torch.tensor([True, False, True])
    u = UnpairedLogps(Z, Z, d, torch.zeros(5), torch.zeros(5), length=torch.tensor([1, 2, 3]))
    assert u.kl_logp.shape == (5,)  # mismatched pairs may be a different number than the examples
    with pytest.raises(TypeError, match="desirable must be a bool tensor"):
        UnpairedLogps(Z, Z, torch.tensor([1, 0, 1]))
    with pytest.raises(ValueError, match="desirable"):
        UnpairedLogps(Z, Z, torch.tensor([True]))
    with pytest.raises(ValueError, match="ref_logp"):
        UnpairedLogps(Z, torch.zeros(2), d)
    with pytest.raises(ValueError, match="kl_logp and kl_ref_logp"):
        UnpairedLogps(Z, Z, d, kl_logp=Z)
    with pytest.raises(ValueError, match="kl_ref_logp"):
        UnpairedLogps(Z, Z, d, torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match="length"):
        UnpairedLogps(Z, Z, d, length=torch.ones(2))
    with pytest.raises(TypeError, match="logp"):
        UnpairedLogps(Z.long(), Z, d)
    with pytest.raises(ValueError, match="kl_logp"):
        UnpairedLogps(Z, Z, d, torch.tensor([float("nan")]), torch.zeros(1)).check_finite()
    up = UnpairedLogps(Z.bfloat16(), Z.bfloat16(), d).upcast()
    assert up.logp.dtype == torch.float32 and up.desirable.dtype == torch.bool


def test_unpaired_length_type_checked():
    with pytest.raises(TypeError, match="length"):
        UnpairedLogps(Z, Z, torch.tensor([True, False, True]), length=[1, 2, 3])


def test_loss_output():
    out = LossOutput(loss=Z, metrics={"a": Z})
    assert out.metrics["a"] is Z
    assert LossOutput(loss=Z).metrics == {}
    with pytest.raises(ValueError, match="metric 'a' must be detached"):
        LossOutput(loss=Z, metrics={"a": Z.clone().requires_grad_()})
    with pytest.raises(TypeError, match="metric 'a' must be a tensor, got float"):
        LossOutput(loss=Z, metrics={"a": 1.0})
    with pytest.raises(TypeError, match=r"loss must be a torch\.Tensor"):
        LossOutput(loss=1.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="loss must be a floating-point"):
        LossOutput(loss=torch.zeros(2, dtype=torch.long))


def test_pair_fields_must_share_a_device():
    meta = torch.zeros(3, device="meta")
    with pytest.raises(ValueError, match="ref_chosen is on meta"):
        PairLogps(Z, Z, meta, Z)


def test_check_mask_names_the_argument():
    from prefopt.types import check_mask

    good = torch.ones(2, 3, dtype=torch.bool)
    assert check_mask("m", good, (2, 3), "x") is good
    with pytest.raises(TypeError, match=r"m must be a torch\.Tensor"):
        check_mask("m", [[True]], (1, 1), "x")
    with pytest.raises(TypeError, match="m must be a bool tensor"):
        check_mask("m", torch.ones(2, 3), (2, 3), "x")
    with pytest.raises(ValueError, match=r"m has shape \(2, 3\) but x has shape \(3, 2\)"):
        check_mask("m", good, (3, 2), "x")


@pytest.mark.parametrize("dtype", [torch.int64, torch.float32])
def test_pair_logps_rejects_negative_or_nan_lengths(dtype):
    z = torch.zeros(3)
    good = torch.tensor([1, 0, 5]).to(dtype)
    PairLogps(z, z, chosen_len=good, rejected_len=good)
    bad = torch.tensor([1, -2, 5]).to(dtype)
    with pytest.raises(ValueError, match=r"chosen_len must hold token counts >= 0, got \[-2"):
        PairLogps(z, z, chosen_len=bad, rejected_len=good)
    with pytest.raises(ValueError, match="rejected_len must hold token counts"):
        PairLogps(z, z, chosen_len=good, rejected_len=bad)
    if dtype.is_floating_point:
        with pytest.raises(ValueError, match="rejected_len must hold token counts"):
            PairLogps(z, z, chosen_len=good, rejected_len=torch.tensor([1.0, float("nan"), 2.0]))


def test_unpack_pair_batch_reads_dataclass_and_mapping_alike():
    ids = torch.tensor([[5, 6, 7, 0], [5, 8, 0, 0]])
    am = (ids != 0).long()
    cm = torch.tensor([[False, True, True, False], [False, True, False, False]])
    batch = PairBatch(
        input_ids=ids,
        attention_mask=am,
        completion_mask=cm,
        prompt_len=torch.tensor([1, 1]),
        completion_len=torch.tensor([2, 1]),
        row_index=torch.tensor([0]),
    )
    got = unpack_pair_batch(batch)
    assert got[0] is ids and got[1] is am and got[2] is cm
    got = unpack_pair_batch({"input_ids": ids, "attention_mask": am, "completion_mask": cm})
    assert got[0] is ids and got[1] is am and got[2] is cm
    ids2, am2, cm2 = unpack_pair_batch({"input_ids": ids, "completion_mask": cm})
    assert ids2 is ids and am2 is None and cm2 is cm
    with pytest.raises(KeyError, match="batch is missing 'completion_mask'"):
        unpack_pair_batch({"input_ids": ids})
    with pytest.raises(TypeError, match="batch must be a PairBatch"):
        unpack_pair_batch([ids, am, cm])
