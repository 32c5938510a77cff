"""CRD (Tian et al. 2020), queue variant: the NCE loss against a hand-worked case, the paper's critic written
out with plain exp / log and RepDistiller's memory-bank constants (the data-set size cancels), finite
differences; the FIFO queue's wrap-around against a deque; the loss module (heads, Z^, enqueue after the step,
an exact state round trip); two gloo ranks enqueueing the same rows; the config, an end-to-end run and the
export of its student."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from collections import deque

import pytest
import torch
import torch.nn.functional as F
from support.exports import export_student
from support.runs import TINY_CONFIG, distill_epoch_row, train

from kdfast.config import CONFIG_DIR, LossConfig, TapConfig, load_config
from kdfast.errors import ConfigError, UsageError
from kdfast.methods.compose import CompositeLoss
from kdfast.methods.crd import CRDConfig, CRDLoss, contrastive_nce, crd_loss, enqueue, nce_normalizer
from kdfast.methods.dkd import DKDConfig, dkd_loss

CONFIG = CONFIG_DIR / "crd_digits.yaml"
TAPS = {"emb": TapConfig(path="pool")}


def _unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def _critic_loss(anchors, positives, negatives, tau, z_hat):
    """Eq. 2-4 with plain exp and log: h = e / (e + K Z^); -log h(pos) - sum_k log(1 - h(neg_k)), batch
    mean."""
    k = negatives.shape[0]
    losses = []
    for i in range(anchors.shape[0]):
        e_pos = torch.exp(anchors[i] @ positives[i] / tau)
        e_neg = torch.exp(negatives @ anchors[i] / tau)
        h_pos, h_neg = e_pos / (e_pos + k * z_hat), e_neg / (e_neg + k * z_hat)
        losses.append(-torch.log(h_pos) - torch.log(1 - h_neg).sum())
    return torch.stack(losses).mean()


def _memory_bank_loss(anchors, positives, negatives, tau, z_hat, data_size):
    """RepDistiller's ContrastMemory + ContrastLoss constants (its 1e-7 eps left out): P = exp(x / tau) / Z,
    Z = M Z^, noise Pn = 1 / M, D1 = P_pos / (P_pos + K Pn), D0 = K Pn / (P_neg + K Pn)."""
    k, z = negatives.shape[0], data_size * z_hat
    p_pos = torch.exp((anchors * positives).sum(1) / tau) / z
    p_neg = torch.exp(anchors @ negatives.T / tau) / z
    noise = k / data_size
    log_d1 = torch.log(p_pos / (p_pos + noise))
    log_d0 = torch.log(noise / (p_neg + noise))
    return -(log_d1.sum() + log_d0.sum()) / anchors.shape[0]


def test_hand_computed_single_anchor():
    # anchor = positive = (1, 0), one negative (0, 1), tau = 0.5, Z^ = 1: scores 2 and 0, c = log(1 * 1) = 0
    anchor = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    negative = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    got = contrastive_nce(anchor, anchor, negative, temperature=0.5, normalizer=1.0)
    assert got.item() == pytest.approx(math.log(1 + math.exp(-2)) + math.log(2), rel=1e-12)
    # Z^: the mean of exp(score / tau) over the positive and the negative scores
    z = nce_normalizer(anchor, anchor, negative, temperature=0.5)
    assert z.item() == pytest.approx((math.exp(2) + 1) / 2, rel=1e-12)


def test_loss_is_the_papers_critic_and_the_memory_bank_form_with_any_data_set_size():
    anchors, positives, negatives = _unit(4, 8, seed=1), _unit(4, 8, seed=2), _unit(32, 8, seed=3)
    z_hat = nce_normalizer(anchors, positives, negatives, temperature=0.07)
    got = contrastive_nce(anchors, positives, negatives, temperature=0.07, normalizer=z_hat)
    torch.testing.assert_close(got, _critic_loss(anchors, positives, negatives, 0.07, z_hat))
    for data_size in (5_000, 1_281_167):
        torch.testing.assert_close(
            got, _memory_bank_loss(anchors, positives, negatives, 0.07, z_hat, data_size)
        )
    assert got.dtype == torch.float64


def test_both_directions_and_gradients():
    s, t = _unit(3, 6, seed=4), _unit(3, 6, seed=5)
    queue_s, queue_t = _unit(10, 6, seed=6), _unit(10, 6, seed=7)
    student_term, teacher_term = crd_loss(s, t, queue_s, queue_t, temperature=0.2, normalizers=(1.5, 0.7))
    torch.testing.assert_close(student_term, _critic_loss(s, t, queue_t, 0.2, 1.5))
    torch.testing.assert_close(teacher_term, _critic_loss(t, s, queue_s, 0.2, 0.7))
    # each direction's gradient is its anchor's (the positive is fixed, eq. 6): against finite differences
    raw = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a: contrastive_nce(F.normalize(a, dim=1), t, queue_t, temperature=0.2, normalizer=1.5), (raw,)
    )


def _repdistiller_crd(v1, v2, memory_v1, memory_v2, idx, tau, n_data):
    """RepDistiller's CRD for one batch, transcribed from github.com/HobbitLong/RepDistiller (commit b84f547)
    ``crd/memory.py`` (ContrastMemory.forward: the sampled memory rows read with ``.detach()``, exp(score /
    T), Z = mean * outputSize set on the first batch) and ``crd/criterion.py`` (ContrastLoss, eps = 1e-7;
    CRDLoss: s_loss + t_loss). v1, v2: the student's and the teacher's embeddings (B, d); idx (B, K + 1),
    column 0 the sample's own memory row (its positive)."""
    batch, k1 = idx.shape
    weight_v1 = torch.index_select(memory_v1, 0, idx.view(-1)).detach().view(batch, k1, -1)
    out_v2 = torch.exp(torch.div(torch.bmm(weight_v1, v2.view(batch, -1, 1)), tau))
    weight_v2 = torch.index_select(memory_v2, 0, idx.view(-1)).detach().view(batch, k1, -1)
    out_v1 = torch.exp(torch.div(torch.bmm(weight_v2, v1.view(batch, -1, 1)), tau))
    z_v1, z_v2 = (out.mean().detach() * n_data for out in (out_v1, out_v2))
    out_v1, out_v2 = torch.div(out_v1, z_v1), torch.div(out_v2, z_v2)

    def contrast_loss(x):
        bsz, m, pn, eps = x.shape[0], x.size(1) - 1, 1 / float(n_data), 1e-7
        p_pos = x.select(1, 0)
        log_d1 = torch.div(p_pos, p_pos.add(m * pn + eps)).log()
        p_neg = x.narrow(1, 1, m)
        log_d0 = torch.div(p_neg.clone().fill_(m * pn), p_neg.add(m * pn + eps)).log()
        return -(log_d1.sum(0) + log_d0.view(-1, 1).sum(0)) / bsz

    return (contrast_loss(out_v1) + contrast_loss(out_v2)).squeeze(), (z_v1 / n_data, z_v2 / n_data)


def test_gradients_are_repdistillers_whose_positives_carry_no_gradient():
    # The memory holds this batch's head outputs (the positives, rows 0..B-1) and the queues (the shared
    # negatives, rows B..B+K-1): RepDistiller's loss on it is the queue variant's, values and gradients
    batch, dim, k, tau = 4, 8, 12, 0.07
    raw_s = torch.randn(batch, dim, dtype=torch.float64, requires_grad=True)
    raw_t = torch.randn(batch, dim, dtype=torch.float64, requires_grad=True)
    s, t = F.normalize(raw_s, dim=1), F.normalize(raw_t, dim=1)
    queue_s, queue_t = _unit(k, dim, seed=8), _unit(k, dim, seed=9)
    memory_v1, memory_v2 = torch.cat([s.detach(), queue_s]), torch.cat([t.detach(), queue_t])
    idx = torch.cat([torch.arange(batch)[:, None], batch + torch.arange(k).expand(batch, k)], dim=1)
    n_data = k  # K / n_data = 1, so RepDistiller's eps moves the loss by 1e-7 relative
    expected, (z_s, z_t) = _repdistiller_crd(s, t, memory_v1, memory_v2, idx, tau, n_data)
    got = sum(crd_loss(s, t, queue_s, queue_t, temperature=tau, normalizers=(z_s, z_t)))
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
    theirs = torch.autograd.grad(expected, (raw_s, raw_t), retain_graph=True)
    mine = torch.autograd.grad(got, (raw_s, raw_t), retain_graph=True)
    for ours, reference in zip(mine, theirs, strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-12)
    # a live positive (the earlier form) gives the student's embedding a second gradient, as L_T's positive
    live = contrastive_nce(s, t, queue_t, temperature=tau, normalizer=z_s)
    live = live + contrastive_nce(t, s, queue_s, temperature=tau, normalizer=z_t)
    (live_grad,) = torch.autograd.grad(live, raw_s)
    assert not torch.allclose(live_grad, theirs[0])


def test_bf16_autocast_does_not_round_the_scores():
    # at tau = 0.07 a bf16 score would move exp(x / tau) by percents; the loss computes in float32
    anchors, positives, negatives = (
        x.float() for x in (_unit(4, 8, seed=1), _unit(4, 8, seed=2), _unit(32, 8))
    )
    exact = contrastive_nce(anchors, positives, negatives, temperature=0.07, normalizer=1.3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = contrastive_nce(anchors, positives, negatives, temperature=0.07, normalizer=1.3)
        z = nce_normalizer(anchors, positives, negatives, temperature=0.07)
    torch.testing.assert_close(under_autocast, exact)
    torch.testing.assert_close(z, nce_normalizer(anchors, positives, negatives, temperature=0.07))


def test_queue_wraps_around_like_a_fifo():
    size, width = 5, 3
    queue = torch.zeros(size, width)
    fifo = deque((row for row in queue.clone()), maxlen=size)  # oldest first
    pointer = 0
    counter = iter(range(1, 1000))
    for count in (3, 4, 1, 7, 5, 2):  # 7 > K: only the last 5 stay
        rows = torch.tensor([[next(counter)] * width for _ in range(count)], dtype=torch.float32)
        pointer = enqueue(queue, pointer, rows)
        fifo.extend(rows)
        # read from the write position on: the oldest row first, the newest last
        in_order = torch.cat([queue[pointer:], queue[:pointer]])
        torch.testing.assert_close(in_order, torch.stack(list(fifo)))
    assert pointer == (3 + 4 + 1 + 7 + 5 + 2) % size


def _module(**cfg):
    section = CRDConfig(student="emb", teacher="emb", feat_dim=4, queue_size=6, temperature=0.1, **cfg)
    return CRDLoss(section, TAPS, TAPS)


def _taps(batch=3, seed=8):
    g = torch.Generator().manual_seed(seed)
    return {"emb": torch.randn(batch, 5, 2, 2, generator=g)}, {"emb": torch.randn(batch, 7, generator=g)}


def test_module_builds_heads_sets_z_and_computes_both_directions():
    torch.manual_seed(0)
    loss = _module()
    student_taps, teacher_taps = _taps()
    with pytest.raises(UsageError, match="call check"):
        loss(None, None, None, student_taps, teacher_taps)
    loss.check(student_taps, teacher_taps)
    s = F.normalize(loss.embed_student(student_taps["emb"].mean(dim=(2, 3))), dim=1)
    t = F.normalize(loss.embed_teacher(teacher_taps["emb"]), dim=1)
    z_s = nce_normalizer(s, t, loss.teacher_queue, temperature=0.1)
    z_t = nce_normalizer(t, s, loss.student_queue, temperature=0.1)
    torch.testing.assert_close(loss.normalizers, torch.stack([z_s, z_t]).detach())
    torch.testing.assert_close(loss.student_queue.norm(dim=1), torch.ones(6))
    feature = student_taps["emb"].clone().requires_grad_(True)
    teacher = teacher_taps["emb"].clone().requires_grad_(True)
    term, parts = loss(None, None, None, {"emb": feature}, {"emb": teacher})
    expected = crd_loss(
        s, t, loss.student_queue, loss.teacher_queue, temperature=0.1, normalizers=(z_s.item(), z_t.item())
    )
    torch.testing.assert_close(parts["student"], expected[0])
    torch.testing.assert_close(parts["teacher"], expected[1])
    torch.testing.assert_close(term, parts["student"] + parts["teacher"])
    term.backward()
    assert feature.grad is not None and teacher.grad is None
    assert loss.embed_student.weight.grad is not None and loss.embed_teacher.weight.grad is not None
    with pytest.raises(UsageError, match="widths"):
        loss.check({"emb": torch.randn(3, 9)}, teacher_taps)
    with pytest.raises(UsageError, match="3 samples and the teacher tap 2"):
        loss.check(student_taps, {"emb": teacher_taps["emb"][:2]})


def test_after_step_enqueues_the_last_training_forward_once_and_state_round_trips():
    torch.manual_seed(1)
    loss = _module()
    student_taps, teacher_taps = _taps(batch=4)
    loss.check(student_taps, teacher_taps)
    before = loss.student_queue.clone()
    loss.eval()
    loss(None, None, None, student_taps, teacher_taps)
    loss.after_step()  # an eval forward keeps nothing
    torch.testing.assert_close(loss.student_queue, before)
    loss.train()
    for _ in range(2):  # 8 rows through a queue of 6: the second batch wraps around
        loss(None, None, None, student_taps, teacher_taps)
        loss.after_step()
        loss.after_step()  # a second call without a forward enqueues nothing
    assert int(loss.queue_pointer) == 8 % 6
    with torch.no_grad():
        s = F.normalize(loss.embed_student(student_taps["emb"].mean(dim=(2, 3))), dim=1)
        t = F.normalize(loss.embed_teacher(teacher_taps["emb"]), dim=1)
    torch.testing.assert_close(loss.student_queue[[4, 5, 0, 1]], s)
    torch.testing.assert_close(loss.teacher_queue[[4, 5, 0, 1]], t)
    torch.testing.assert_close(loss.student_queue[[2, 3]], s[2:])  # the first batch's last two rows
    # resume: a fresh module, sized by check, loads the state and computes the same loss with the same queues
    state = loss.state_dict()
    assert {"student_queue", "teacher_queue", "queue_pointer", "normalizers"} <= set(state)
    torch.manual_seed(99)
    resumed = _module()
    resumed.check(student_taps, teacher_taps)
    resumed.load_state_dict(state)
    for key, value in resumed.state_dict().items():
        torch.testing.assert_close(value, state[key])
    torch.testing.assert_close(
        resumed(None, None, None, student_taps, teacher_taps)[0],
        loss(None, None, None, student_taps, teacher_taps)[0],
    )


def test_composed_with_dkd_every_hook_reaches_its_member():
    # a logit method plus a representation method, as papers combine them: each term weighted, each hook
    # (start_epoch: DKD's warm-up, check and after_step: CRD's heads and queue) delivered
    crd_section = CRDConfig(
        weight=0.8, student="emb", teacher="emb", feat_dim=4, queue_size=6, temperature=0.1
    )
    sections = {"dkd": DKDConfig(weight=0.5, warmup=4), "crd": crd_section}
    cfg = LossConfig(method=["dkd", "crd"], ce=1.0, sections=sections)
    torch.manual_seed(2)
    composite = CompositeLoss(cfg, TAPS, TAPS)
    student_taps, teacher_taps = _taps(batch=3)
    composite.check(student_taps, teacher_taps)
    composite.start_epoch(1, 240)
    g = torch.Generator().manual_seed(3)
    logits, teacher_logits = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    targets = torch.tensor([0, 4, 2])
    total, parts = composite(logits, teacher_logits, targets, student_taps, teacher_taps)
    dkd = dkd_loss(logits, teacher_logits, targets, alpha=1.0, beta=8.0, temperature=4.0)
    torch.testing.assert_close(parts["dkd"], 0.5 * (2 / 4) * dkd)
    crd = composite.members["crd"]
    torch.testing.assert_close(parts["crd"], 0.8 * (parts["crd/student"] + parts["crd/teacher"]))
    torch.testing.assert_close(total, parts["ce"] + parts["dkd"] + parts["crd"])
    composite.after_step()
    assert int(crd.queue_pointer) == 3


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("loss.crd.student=nope", "loss.crd.student names no student tap 'nope'"),
        ("loss.crd.queue_size=0", "'loss.crd.queue_size' must be > 0"),
        ("loss.crd.temperature=0", "'loss.crd.temperature' must be > 0"),
        ("loss.crd.feat_dim=12.5", "'loss.crd.feat_dim' must be int"),
    ],
)
def test_config_validation(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIG, [override])


DDP_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch
    import torch.distributed as dist
    from kdfast.config import TapConfig
    from kdfast.methods.crd import CRDConfig, CRDLoss

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    taps = {"emb": TapConfig(path="pool")}
    torch.manual_seed(0)  # the same heads on every rank, as run_training's seeding gives
    section = CRDConfig(student="emb", teacher="emb", feat_dim=4, queue_size=5, temperature=0.1)
    loss = CRDLoss(section, taps, taps)
    g = torch.Generator().manual_seed(10 + rank)  # each rank its own batch
    student, teacher = {"emb": torch.randn(2, 3, generator=g)}, {"emb": torch.randn(2, 6, generator=g)}
    loss.check(student, teacher)
    loss(None, None, None, student, teacher)
    s_rows, t_rows = (x.tolist() for x in loss._stash)
    loss.after_step()
    result = {
        "rows": s_rows, "teacher_rows": t_rows, "queue": loss.student_queue.tolist(),
        "teacher_queue": loss.teacher_queue.tolist(), "pointer": int(loss.queue_pointer),
        "normalizers": loss.normalizers.tolist(),
    }
    with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()
    """
)


@pytest.mark.slow
def test_two_gloo_ranks_enqueue_every_ranks_rows_in_rank_order(tmp_path):
    script = tmp_path / "crd_ddp.py"
    script.write_text(DDP_SCRIPT)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(
        [*command, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["queue"] == ranks[1]["queue"] and ranks[0]["teacher_queue"] == ranks[1]["teacher_queue"]
    assert ranks[0]["rows"] != ranks[1]["rows"]
    # 4 gathered rows written at slots 0..3 in rank order; the pointer moved by the global batch
    assert ranks[0]["queue"][:4] == ranks[0]["rows"] + ranks[1]["rows"]
    assert ranks[0]["teacher_queue"][:4] == ranks[0]["teacher_rows"] + ranks[1]["teacher_rows"]
    assert ranks[0]["pointer"] == ranks[1]["pointer"] == 4
    assert ranks[0]["normalizers"] == ranks[1]["normalizers"]  # averaged over the ranks' probe batches


@pytest.mark.slow
def test_crd_digits_config_runs_end_to_end_and_its_student_exports(tmp_path):
    out = tmp_path / "run"
    result = train(out, TINY_CONFIG, CONFIG)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = torch.load(out / "student.pt", weights_only=True)
    assert ckpt["format"] == "kdfast.student/1" and ckpt["config"]["loss"]["method"] == ["crd"]
    assert not any("embed" in key or "queue" in key for key in ckpt["state_dict"])  # heads stay behind
    state = torch.load(out / "state_distill.pt", weights_only=True)
    assert state["extra"]["members.crd.queue_pointer"].item() == 64 % 1024  # two steps of 32 enqueued
    parts = distill_epoch_row(out)["parts"]
    assert set(parts) == {"ce", "crd", "crd/student", "crd/teacher"}
    assert parts["crd"] == pytest.approx(0.8 * (parts["crd/student"] + parts["crd/teacher"]), rel=1e-5)
    export_student(out)
