"""Agent attention against the formulas written out, and a merged diffusers Attention layer."""

import pytest
import torch
from diffusers.models.attention_processor import (
    Attention,
    AttnProcessor2_0,
    CustomDiffusionAttnProcessor2_0,
    PAGIdentitySelfAttnProcessor2_0,
)
from reference import agent_attention_reference

from agentsd import AgentSDConfig, agent_attention
from agentsd.diffusers_patch.forwards import stage_forward
from agentsd.diffusers_patch.layers import accepted_keywords, processor_kwargs
from agentsd.diffusers_patch.state import BlockState, UNetState
from agentsd.diffusers_patch.timesteps import NoiseRule
from agentsd.merge import make_plan


def _qkva(dtype=torch.float32, b=2, h=3, n=50, m=7, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, size, d, generator=g).to(dtype) for size in (n, n, n, m)]


@pytest.mark.parametrize("k_scale2,k_shortcut", [(0.3, 0.075), (1.0, 0.0), (0.5, 0.2)])
def test_agent_attention_matches_the_formulas(k_scale2, k_shortcut):
    q, k, v, a = _qkva(torch.float64)
    ours = agent_attention(q, k, v, a, k_scale2, k_shortcut)
    assert torch.allclose(ours, agent_attention_reference(q, k, v, a, k_scale2, k_shortcut), atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_agent_attention_low_precision_and_fp32_upcast(dtype):
    q, k, v, a = _qkva(torch.float32)
    exact = agent_attention_reference(q, k, v, a, 0.3, 0.075)
    low = [t.to(dtype) for t in (q, k, v, a)]
    plain, upcast = agent_attention(*low), agent_attention(*low, upcast=True)
    assert plain.dtype == upcast.dtype == dtype
    tol = 2e-2 if dtype == torch.float16 else 6e-2
    assert torch.allclose(plain.float(), exact, atol=tol)
    assert (upcast.float() - exact).abs().max() <= (plain.float() - exact).abs().max() + 1e-3


def _stage(**phase):
    """A patched block's ``attn1`` stage (not installed), and a function giving its plan for a metric."""
    config = AgentSDConfig(schedule="fixed", use_rand=False, **phase)
    unet = UNetState(config=config, rule=NoiseRule(1000))
    block = BlockState(unet=unet, index=0, downsample=1)
    unet.blocks.append(block)
    unet.start_call(torch.zeros(1, 4, 8, 8), 999)
    attn = _attention()

    def run(x, plan, *args, **kwargs):
        block.plan = plan
        return stage_forward(attn, block, "attn1", "self")(x, *args, **kwargs)

    return attn, run, lambda metric: make_plan(config.phases[0], block.layout, metric)


def _attention(seed=0):
    torch.manual_seed(seed)
    return Attention(query_dim=32, heads=4, dim_head=8).eval()


def test_self_attention_with_agents_equals_plain_implementation():
    attn, run, plan_of = _stage(ratio=0.4, sx=4, sy=4, agent_ratio=0.9)
    x = torch.randn(2, 64, 32)
    normed = torch.nn.functional.layer_norm(x, (32,))
    plan = plan_of(x)
    assert plan.agents is not None
    with torch.no_grad():
        ours = run(normed, plan)
        feats, agents = plan.merge(normed), plan.agents.merge(normed)
        heads = lambda t: t.unflatten(-1, (4, 8)).transpose(1, 2)  # noqa: E731
        out = agent_attention_reference(
            heads(attn.to_q(feats)),
            heads(attn.to_k(feats)),
            heads(attn.to_v(feats)),
            heads(attn.to_q(agents)),
            0.3,
            0.075,
        )
        expected = plan.unmerge(attn.to_out[0](out.transpose(1, 2).flatten(2)))
    assert ours.shape == x.shape
    assert torch.allclose(ours, expected, atol=1e-5)


def test_without_agents_the_layer_runs_its_own_processor_on_merged_tokens():
    attn, run, plan_of = _stage(ratio=0.5, sx=2, sy=2, agent_ratio=0.5)
    x = torch.randn(2, 64, 32)
    plan = plan_of(x)
    assert plan.agents is None
    with torch.no_grad():
        expected = plan.unmerge(AttnProcessor2_0()(attn, plan.merge(x)))
        assert torch.equal(run(x, plan), expected)


class _Recorder:
    """A processor that counts its calls and otherwise computes plain attention (an attention-map recorder)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        self.calls += 1
        return AttnProcessor2_0()(attn, hidden_states, encoder_hidden_states, attention_mask)


@pytest.mark.parametrize(
    "processor",
    [
        lambda: CustomDiffusionAttnProcessor2_0(train_q_out=True, hidden_size=32).eval(),
        lambda: PAGIdentitySelfAttnProcessor2_0(),
        _Recorder,
        lambda: type("SubclassOfSDPA", (AttnProcessor2_0,), {})(),
    ],
    ids=["custom-diffusion", "pag", "recorder", "subclass"],
)
def test_agents_stand_in_only_for_plain_softmax_processors(processor):
    """Any other processor (weights, PAG's perturbation, a recorder, a subclass that may do more) is
    called, on the merged tokens, so nothing it does is lost."""
    attn, run, plan_of = _stage(ratio=0.4, sx=4, sy=4, agent_ratio=0.9)
    x = torch.randn(2, 64, 32)
    plan = plan_of(x)
    attn.set_processor(processor())
    with torch.no_grad():
        assert torch.equal(run(x, plan), plan.unmerge(attn(plan.merge(x))))
    if isinstance(attn.processor, _Recorder):
        assert attn.processor.calls == 2


def test_agents_are_skipped_for_cross_attention_and_masks():
    """Those calls go through the layer's processor on the merged tokens, with the keywords it accepts."""
    attn, run, plan_of = _stage(ratio=0.4, sx=4, sy=4, agent_ratio=0.9)
    x = torch.randn(2, 64, 32)
    plan = plan_of(x)
    context = torch.randn(2, 5, 32)
    with torch.no_grad():
        cross = plan.unmerge(attn(plan.merge(x), encoder_hidden_states=context))
        assert torch.equal(run(x, plan, encoder_hidden_states=context, unknown=1), cross)
        masked = plan.unmerge(attn(plan.merge(x), None, torch.zeros(2, 1, plan.tokens.num_merged)))
        assert torch.equal(run(x, plan, None, torch.zeros(2, 1, plan.tokens.num_merged)), masked)
    call_kwargs, plain = processor_kwargs(
        {"encoder_hidden_states": context, "unknown": 1}, accepted_keywords(attn.processor)
    )
    assert call_kwargs == {"encoder_hidden_states": context} and not plain
    assert processor_kwargs({}, frozenset())[1]
