"""One-shot pruners: exact sparsity / N:M for every method and granularity, Wanda's score, SparseGPT
beating magnitude on reconstruction, the layer-by-layer protocol (inputs of layer i+1 are the
pruned layer i's outputs; one layer's activations and weights in memory), named errors, and
launch/prune.py end to end."""
import copy
import gc
import json
import subprocess
import sys

import pytest
import torch

from seft_scale.config import ModelConfig, PruneConfig, SeftConfig, TinyModelConfig, load_config
from seft_scale.errors import ConfigError
from seft_scale.model import build_tiny_llama, find_targets, save_model, train_tokenizer
from seft_scale.prune import prune_folder, prune_model
from seft_scale.prune.calibration import calibration_windows, tokenize
from seft_scale.prune.masks import keep_mask, pruned_count
from seft_scale.prune.sequential import decoder_layers, prune_weight
from seft_scale.prune.sparsegpt import Hessian, sparsegpt_prune
from seft_scale.prune.wanda import InputNorms, wanda_scores
from seft_scale.sparsity import nm_group_counts

from tests.conftest import ROOT

TEXT = ROOT / "configs" / "data" / "tempest.txt"
TARGETS = SeftConfig().targets
SEQLEN, HIDDEN = 48, 64  # distinct from every weight dimension, so activations are recognisable


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model, tokenizer, saved folder): a 3-layer float64 Llama (float64 so that batched and
    per-window forwards agree far below any score gap)."""
    tok = train_tokenizer(TEXT.read_text(), 384)
    cfg = ModelConfig(tiny=TinyModelConfig(hidden_size=HIDDEN, intermediate_size=128,
                                           num_hidden_layers=3, seed=1))
    model = build_tiny_llama(cfg, len(tok), torch.float64, "sdpa").eval()
    model.config.use_cache = False
    folder = tmp_path_factory.mktemp("tiny") / "model"
    save_model(model, tok, folder)
    return model, tok, folder


def cfg(method="wanda", **kw):
    kw = {"sparsity": 0.6, "calib_data": str(TEXT), "nsamples": 6, "seqlen": SEQLEN, **kw}
    return PruneConfig(method=method, **kw).validate()


def pruned_copy(tiny, c):
    model, tok, _ = tiny
    m = copy.deepcopy(model)
    report = prune_model(m, tok, find_targets(m, TARGETS), c, "cpu")
    return m, report


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern,granularity", [("unstructured", "row"), ("unstructured", "matrix"),
                                                 ("2:4", "row"), ("4:8", "row")])
def test_exact_sparsity_and_nm(tiny, method, pattern, granularity):
    m, report = pruned_copy(tiny, cfg(method, pattern=pattern, granularity=granularity))
    before = dict(tiny[0].named_parameters())
    assert len(report) == 3 * 7
    for name, lin in find_targets(m, TARGETS):
        w = lin.weight.detach()
        d_out, d_in = w.shape
        zeros = w == 0
        if pattern != "unstructured":
            n, mm = map(int, pattern.split(":"))
            assert bool((nm_group_counts(w, mm) == n).all()), name
        elif granularity == "row":
            assert (zeros.sum(1) == pruned_count(d_in, 0.6)).all(), name
        else:
            assert int(zeros.sum()) == pruned_count(d_out * d_in, 0.6), name
        entry = report[name]
        assert entry["nnz"] == entry["budget"] == int((~zeros).sum())
        if method != "sparsegpt":  # the kept weights are untouched (SparseGPT updates them)
            assert torch.equal(w[~zeros], before[f"{name}.weight"][~zeros])
    untouched = [k for k in before if not any(t in k for t in TARGETS)]
    assert untouched and all(torch.equal(before[k], dict(m.named_parameters())[k]) for k in untouched)


def test_wanda_score_is_weight_times_input_norm():
    w = torch.tensor([[1.0, -2.0, 3.0, -4.0], [4.0, 3.0, -2.0, 1.0]])
    x = torch.tensor([[6.0, 0.3, 0.6, 1.2], [8.0, 0.4, 0.8, 1.6]])  # column norms 10, .5, 1, 2
    norms = InputNorms(4, "cpu")
    norms.add(x[:1])
    norms.add(x[1:])  # accumulated over batches
    expected = torch.tensor([[10.0, 1.0, 3.0, 8.0], [40.0, 1.5, 2.0, 2.0]])
    torch.testing.assert_close(wanda_scores(w, norms.sq_norms), expected)
    torch.testing.assert_close(wanda_scores(w, norms.sq_norms), w.abs() * x.norm(dim=0))
    pruned = w.clone()
    keep = prune_weight(pruned, PruneConfig(method="wanda", sparsity=0.5), norms)
    # per row: keep the two best scores (the 2.0 tie of row 1 keeps the lower column)
    assert keep.tolist() == [[True, False, False, True], [True, False, True, False]]
    assert torch.equal(pruned, w * keep)
    # magnitude would keep other weights: the input norms decide
    assert not torch.equal(keep, keep_mask(w.abs(), 0.5))


def test_layerwise_protocol_feeds_pruned_outputs(tiny):
    """Wanda's masks in layer 0 and 1 equal those recomputed by hand from the calibration windows:
    layer 0 from the embeddings, layer 1 from the outputs of the *pruned* layer 0."""
    model, tok, _ = tiny
    c = cfg("wanda", pattern="unstructured")
    m, _ = pruned_copy(tiny, c)
    windows = calibration_windows(TEXT.read_text(), tok, c.nsamples, c.seqlen, c.seed)
    with torch.no_grad():
        hidden = m(input_ids=windows, output_hidden_states=True).hidden_states
    _, layers = decoder_layers(model)
    for i in (0, 1):
        x = layers[i].input_layernorm(hidden[i]).reshape(-1, HIDDEN)  # the input of q/k/v
        for proj in ("q_proj", "k_proj", "v_proj"):
            w = getattr(layers[i].self_attn, proj).weight
            keep = keep_mask(w.abs() * x.norm(dim=0), c.sparsity)
            got = getattr(decoder_layers(m)[1][i].self_attn, proj).weight != 0
            assert torch.equal(got, keep), f"layer {i} {proj}"


def correlated_inputs(tokens=2048, d_in=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d_in, d_in, generator=g) * 0.3 + torch.eye(d_in)
    mix[:, : d_in // 2] += torch.randn(d_in, 1, generator=g)  # a shared component: strong correlation
    scale = torch.rand(d_in, generator=g) * 4 + 0.2
    return torch.randn(tokens, d_in, generator=g, dtype=torch.float64) @ mix.double() * scale.double()


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_reconstructs_better_than_magnitude(pattern):
    x = correlated_inputs()
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    h = Hessian(64, "cpu")
    for chunk in x.split(500):
        h.add(chunk)
    torch.testing.assert_close(h.hessian.double(), x.T @ x / len(x), rtol=1e-4, atol=1e-3)
    sgpt, keep = sparsegpt_prune(w, h.hessian, 0.5, pattern, "row", block_size=16)
    mag = w * keep_mask(w.abs(), 0.5, pattern)
    error = lambda v: float(((x @ w.T - x @ v.T.double()) ** 2).sum())  # noqa: E731
    assert torch.equal(sgpt != 0, keep) and int(keep.sum()) == 32 * 32
    assert error(sgpt) < 0.5 * error(mag), (error(sgpt), error(mag))


def test_sparsegpt_exact_counts_across_blocks():
    """Row and matrix counts stay exact when the column blocks do not divide d_in."""
    x = correlated_inputs(512, 50)
    w = torch.randn(7, 50, dtype=torch.float64)
    for gran in ("row", "matrix"):
        for s in (0.3, 0.55):
            _, keep = sparsegpt_prune(w, x.T @ x / len(x), s, "unstructured", gran, block_size=16)
            if gran == "row":
                assert (keep.sum(1) == 50 - pruned_count(50, s)).all()
            else:
                assert int(keep.sum()) == 350 - pruned_count(350, s)


def test_calibration_holds_one_layer_of_activations(tiny):
    """Measured, not self-reported: whenever a decoder layer runs, every live tensor shaped like
    hidden states ([..., T, h]) is found by the garbage collector and its storage counted."""
    model, tok, _ = tiny
    deep = copy.deepcopy(model)
    deep.model.layers.extend(copy.deepcopy(deep.model.layers))  # 6 layers: holding all would show
    deep.config.num_hidden_layers = 6
    c = cfg("sparsegpt", nsamples=4)
    seen, calls = [], []

    def census(module, args, kwargs):
        calls.append(1)
        if args[0].storage_offset() != 0:  # the census is slow: take it at each pass's first window
            return
        storages = {}
        for obj in gc.get_objects():
            if isinstance(obj, torch.Tensor) and obj.dim() >= 2 and tuple(obj.shape[-2:]) == (SEQLEN, HIDDEN):
                s = obj.untyped_storage()
                storages[s.data_ptr()] = s.nbytes()
        seen.append(sum(storages.values()))

    hooks = [layer.register_forward_pre_hook(census, with_kwargs=True) for layer in deep.model.layers]
    prune_model(deep, tok, find_targets(deep, TARGETS), c, "cpu")
    for h in hooks:
        h.remove()
    buffer = c.nsamples * SEQLEN * HIDDEN * 8  # float64
    assert len(calls) == 2 * 6 * c.nsamples - c.nsamples  # statistics pass + recompute, last layer once
    assert len(seen) == 2 * 6 - 1
    assert buffer <= max(seen) <= 2 * buffer + SEQLEN * HIDDEN * 8, (max(seen), buffer)


def test_streaming_holds_one_layer_of_weights(tiny, tmp_path, monkeypatch):
    """prune_folder: when a decoder layer runs, it is the only one with weights in memory."""
    _, _, folder = tiny
    import seft_scale.prune.sequential as seq
    materialised, find_layers = [], seq.decoder_layers

    def spy(model):
        name, layers = find_layers(model)
        count = lambda *_: materialised.append(  # noqa: E731
            sum(not next(lay.parameters()).is_meta for lay in layers))
        for layer in layers:
            layer.register_forward_pre_hook(count)
        return name, layers

    monkeypatch.setattr(seq, "decoder_layers", spy)
    report = prune_folder(folder, tmp_path / "out", cfg("wanda"), log=lambda *_: None)
    assert len(materialised) == 2 * 3 * 6 - 6 and set(materialised) == {1}
    assert report["summary"]["exact_budget"] and abs(report["summary"]["sparsity"] - 0.6) < 0.01


def test_calibration_windows(tiny):
    _, tok, _ = tiny
    text = TEXT.read_text()
    ids = tokenize(text, tok).tolist()
    a = calibration_windows(text, tok, 5, 32, seed=0)
    assert a.shape == (5, 32) and torch.equal(a, calibration_windows(text, tok, 5, 32, seed=0))
    assert not torch.equal(a, calibration_windows(text, tok, 5, 32, seed=1))
    for row in a.tolist():  # every window is a run of consecutive tokens of the text
        starts = [i for i in range(len(ids) - 31) if ids[i] == row[0] and ids[i: i + 32] == row]
        assert starts
    with pytest.raises(ConfigError, match=r"has \d+ tokens; nsamples × seqlen = 1000 × 2048 needs 2048000"):
        calibration_windows(text, tok, 1000, 2048, 0)


def test_bad_inputs_named_errors(tiny, tmp_path):
    _, _, folder = tiny
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=r"--model: .* \(no config.json\)"):
        prune_folder(tmp_path / "missing", out, cfg())
    with pytest.raises(ConfigError, match="prune.calib_data.*: .*nope.txt does not exist"):
        prune_folder(folder, out, PruneConfig(method="wanda", calib_data=str(tmp_path / "nope.txt")))
    with pytest.raises(ConfigError, match="prune.calib_data: method sparsegpt needs calibration text"):
        prune_folder(folder, out, PruneConfig(method="sparsegpt"))
    with pytest.raises(ConfigError, match=r"the text has \d+ tokens; .* needs 480000"):
        prune_folder(folder, out, cfg(nsamples=10000))
    with pytest.raises(ConfigError, match="prune.pattern"):
        prune_folder(folder, out, cfg(pattern="2:4:8"))
    with pytest.raises(ConfigError, match="3:6 needs d_in divisible by 6; not so for model.layers.0"):
        prune_folder(folder, out, cfg(pattern="3:6"))
    (out / "x").parent.mkdir()
    (out / "x").write_text("")
    with pytest.raises(ConfigError, match="--out: .* is not an empty folder"):
        prune_folder(folder, out, cfg())
    with pytest.raises(ConfigError, match="prune.calib_data: method wanda needs calibration text"):
        load_config(str(ROOT / "configs" / "runs" / "tiny.yaml"), ["prune.method=wanda"])
    with pytest.raises(ConfigError, match="prune.nsamples: must be > 0"):
        cfg(nsamples=0)


def test_cli_end_to_end(tiny, tmp_path):
    """launch/prune.py writes an HF folder that loads with AutoModelForCausalLM, has exactly the
    reported 2:4 sparsity and equals pruning the model in memory, bit for bit."""
    model, tok, folder = tiny
    out = tmp_path / "pruned"
    cmd = [sys.executable, str(ROOT / "launch" / "prune.py"), "--model", str(folder), "--method",
           "sparsegpt", "--pattern", "2:4", "--calib-data", str(TEXT), "--nsamples", "6",
           "--seqlen", str(SEQLEN), "--dtype", "float64", "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "peak RSS: measured" in res.stdout and "predicted" in res.stdout
    from transformers import AutoModelForCausalLM
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64)
    report = json.loads((out / "prune_report.json").read_text())
    assert report["summary"]["nm_valid"] and report["summary"]["sparsity"] == 0.5
    reference, _ = pruned_copy(tiny, cfg("sparsegpt", pattern="2:4", sparsity=0.5))
    expected = dict(reference.named_parameters())
    for name, p in loaded.named_parameters():
        assert torch.equal(p, expected[name]), name
    for name, lin in find_targets(loaded, TARGETS):
        assert int((lin.weight != 0).sum()) == report["matrices"][name]["nnz"]
    assert (out / "tokenizer.json").is_file() and (out / "model.safetensors.index.json").is_file()


def test_cli_flag_errors(tiny, tmp_path, capsys):
    import importlib.util
    spec = importlib.util.spec_from_file_location("prune_cli", ROOT / "launch" / "prune.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    base = ["--model", str(tiny[2]), "--out", str(tmp_path / "o"), "--calib-data", str(TEXT)]
    assert cli.main(base + ["--method", "wanda", "--pattern", "2:4", "--sparsity", "0.7"]) == 2
    assert "--sparsity 0.7 contradicts --pattern 2:4" in capsys.readouterr().err
    assert cli.main(base + ["--sparsity", "0.5"]) == 2
    assert "--method: required" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_calibration_text_from_any_data_source(tmp_path):
    """--calib-data takes what data.train takes: a jsonl of {"text": ...} gives its documents."""
    import json as _json
    from seft_scale.prune.calibration import read_calibration_text
    docs = ["First calibration document.", "Second one, longer than the first."]
    f = tmp_path / "calib.jsonl"
    f.write_text("".join(_json.dumps({"text": d}) + "\n" for d in docs))
    text = read_calibration_text(str(f))
    assert all(d in text for d in docs)
    with pytest.raises(ConfigError, match="calib_data"):
        read_calibration_text(str(tmp_path / "missing.jsonl"))
