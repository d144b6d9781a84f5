import torch

from glsd_cli.pretraining import build_pretraining


def test_teacher_ema_formula(tiny_cfg):
    method = build_pretraining(tiny_cfg, 96).method
    with torch.no_grad():
        for p in method.student.parameters():
            p.add_(torch.randn_like(p))
    before_t = {k: v.clone() for k, v in method.teacher.named_parameters()}
    student = {k: v.clone() for k, v in method.student.named_parameters()}
    method.update_teacher(0.9)
    for name, p in method.teacher.named_parameters():
        assert torch.allclose(p, 0.9 * before_t[name] + 0.1 * student[name], atol=1e-6), name


def test_teacher_starts_equal_and_is_frozen(tiny_cfg):
    method = build_pretraining(tiny_cfg, 96).method
    for (n_s, p_s), (n_t, p_t) in zip(method.student.named_parameters(), method.teacher.named_parameters()):
        assert n_s == n_t and torch.equal(p_s, p_t)
        assert not p_t.requires_grad
