"""The S2T-Local flow end to end on a tiny pair, through the commands a user runs: collect selection logs,
`s2t distill` them into an adapter, and serve `s2t-local` with it."""

import json

import pytest

from s2t.cli import main as s2t_main
from s2t.collect import collect
from s2t.config import load_settings
from s2t.runtime import Engine, load_model
from s2t.v1 import generation_pb2 as pb
from servers import Stack, gsm8k_train_available, plain_selector
from tiny import make_tiny_model_dir

HAVE_TRAIN = gsm8k_train_available()


@pytest.mark.skipif(not HAVE_TRAIN, reason="GSM8K train split not available (../shared/data/gsm8k)")
async def test_collect_distill_serve(tmp_path, one_thread):
    # 288 rows: the byte-level tokenizer uses 259, leaving the 16 score-bin rows the default adapter needs
    slm = make_tiny_model_dir(tmp_path / "slm", seed=1, vocab_rows=288)
    llm = make_tiny_model_dir(tmp_path / "llm", seed=2, vocab_rows=288)
    flags = {"cache_dir": str(tmp_path / "cache"), "data_dir": str(tmp_path / "data"), "worker.model": str(slm),
             "selector.model": str(llm), "worker.runtime.weight_formats": "native",
             "selector.runtime.weight_formats": "native", "worker.port": 0, "selector.grpc_port": 0,
             "selector.max_positions": 16, "worker.draft_confidence": 0.0}
    settings = load_settings(**flags)
    core, server, port = await plain_selector(settings)
    try:
        engine = Engine(load_model(str(slm), settings.cache_dir, "native"))
        await collect(engine, f"127.0.0.1:{port}", "", tmp_path / "collect", problems=4, k=8, max_new_tokens=24,
                      max_positions=16, batch=4)
    finally:
        await server.stop(0)
        core.close()

    out = tmp_path / "distill"
    argv = [f"--set={k}={v}" for k, v in flags.items()]
    # --eval-share 0.5 holds out collect-train-3 (session ids are fixed, the split hashes them), trains on 0-2
    s2t_main(argv + ["distill", "--tau", "1", "--epochs", "1", "--max-steps", "4", "--rank", "4",
                     "--eval-share", "0.5", "--eval-every", "2", "--out", str(out)])
    row = json.loads((out / "row.json").read_text())
    assert row["mode"] == "distill" and row["kind"] == "training" and row["groups"] > 0 and row["eval_groups"] > 0
    # --eval-every 2: held-out points before training, after step 2, and at the end (3 training sessions: 3 steps)
    curve = json.loads((out / "summary.json").read_text())["eval_curve"]
    assert [point["step"] for point in curve] == [0, 2, 3] and curve[-1]["agreement_at_1"] == row["agreement_at_1"]
    manifest = json.loads((out / "adapter" / "s2t-adapter.json").read_text())
    assert manifest["base_weights_sha256"] == engine.lm.weights_sha256 and manifest["bin_ids"] == list(range(272, 288))

    served = load_settings(**{**flags, "worker.trigger": "always", "worker.adapter_dir": str(out / "adapter")})
    async with Stack(served) as stack:
        final = await stack.generate("What is 2 + 3?", mode=pb.MODE_S2T_LOCAL, max_new_tokens=8)
    assert final.stats.mode_used == pb.MODE_S2T_LOCAL and final.stats.adapter_version == manifest["version"]
    assert final.stats.reranked_positions > 0 and final.stats.selector_calls == 0
