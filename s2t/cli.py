"""`s2t`: one command line for every part of the service.

  s2t run                 fetch the models (first run), start a local selector (Ray Serve) and a worker,
                          stream one GSM8K test question in s2t mode, print the stats, shut down
  s2t fetch-models        download, verify and convert the embedded models into the cache
  s2t calibrate           trigger thresholds from GSM8K train prompts (written beside the models)
  s2t serve-selector      the selector: Ray Serve with gRPC ingress (or --no-ray: a plain grpc.aio server)
  s2t serve-worker        the worker's gRPC server
  s2t generate PROMPT     a client request to a running worker
  s2t collect             GSM8K train rollouts of the SLM, every position labelled by the selector (logs)
  s2t distill             selection logs -> an S2T-Local adapter for the worker (train, evaluate, export)
  s2t distill-groups      selection logs -> S2T-Local training groups (JSON lines)
  s2t config              print the effective configuration

Configuration: --config FILE (YAML), S2T_* environment variables, --set section.key=value (highest).
"""

from __future__ import annotations

import argparse
import asyncio
import enum
import json
import logging
import os
import signal
import sys
from datetime import datetime, timezone
from pathlib import Path

import yaml

from .config import ConfigError, Settings, load_settings
from .modes import Mode

log = logging.getLogger("s2t")


def _settings(args) -> Settings:
    overrides = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects section.key=value, got {item!r}")
        overrides[key] = yaml.safe_load(value) if value else value
    return load_settings(args.config, **overrides)


def _fetch_needed(settings: Settings, which=("worker", "selector")) -> None:
    from .model_store import REGISTRY, fetch_models

    names = [getattr(settings, w).model for w in which]
    fetch_models([n for n in dict.fromkeys(names) if n in REGISTRY and not Path(n).is_dir()], settings.cache_dir)


# -- subcommands ----------------------------------------------------------------------------------------------


def cmd_fetch_models(args) -> None:
    from .model_store import REGISTRY, fetch_models

    settings = _settings(args)
    names = args.models or list(REGISTRY)
    for path in fetch_models(names, settings.cache_dir, keep_gguf=args.keep_gguf):
        print(path)


def cmd_config(args) -> None:
    print(yaml.safe_dump(json.loads(_settings(args).model_dump_json()), sort_keys=False))


def cmd_calibrate(args) -> None:
    from . import gsm8k
    from .calibration import calibrate, write_calibration
    from .prompts import chat_prompt_ids
    from .runtime import Engine, load_with

    settings = _settings(args)
    _fetch_needed(settings)
    ws, sel = settings.worker, settings.selector
    slm = Engine(load_with(ws.model, settings.cache_dir, ws.runtime))
    problems = gsm8k.load("train", 0, args.problems)
    prompts = [chat_prompt_ids(slm.lm.tokenizer, ws.system_prompt, p["question"]) for p in problems]
    llm = None if args.no_llm else Engine(load_with(sel.model, settings.cache_dir, sel.runtime))
    result = calibrate(slm, llm, [list(p) for p in prompts], args.max_new_tokens, ws.warmup_steps,
                       ws.num_candidates, log=lambda m: print(m, file=sys.stderr))
    path = Path(args.output) if args.output else settings.calibration_file()
    write_calibration(path, result)
    print(json.dumps({k: result[k] for k in result if k in ("entropy", "margin", "kl", "divergence_rate", "recall")},
                     indent=1))
    print(path)


def cmd_serve_selector(args) -> None:
    settings = _settings(args)
    _fetch_needed(settings, ("selector",))
    if args.no_ray:
        from llm_selector.grpc_server import serve_forever

        asyncio.run(serve_forever(settings))
        return
    from llm_selector import serve_app

    address = serve_app.start(settings)
    print(f"selector serving gRPC on {address} (application {settings.selector.application!r}); Ctrl-C stops it",
          flush=True)
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        serve_app.stop()


def cmd_serve_worker(args) -> None:
    settings = _settings(args)
    _fetch_needed(settings, ("worker",))

    async def main():
        from slm_worker.server import Worker, serve

        from .wire import serve_until_signalled

        worker = Worker(settings)
        await worker.start(wait_for_selector_s=args.wait_for_selector)
        server, port = await serve(worker, settings.worker.host, settings.worker.port)
        print(f"worker serving gRPC on {settings.worker.host}:{port}", flush=True)
        try:
            await serve_until_signalled(server, settings.worker.shutdown_grace_s)  # drains running requests
        finally:
            await worker.stop()

    asyncio.run(main())


def _request(prompt: str, args):
    from s2t.v1 import generation_pb2 as pb

    from .modes import Mode, TriggerKind

    opts = pb.GenerationOptions(
        mode=Mode(args.mode).proto if args.mode else 0,
        max_new_tokens=args.max_new_tokens or 0, block_size=args.block_size or 0,
        trigger=TriggerKind(args.trigger).proto if args.trigger else 0,
        trigger_rate=args.trigger_rate or 0.0, temperature=args.temperature or 0.0, top_p=args.top_p or 0.0,
        seed=args.seed or 0)
    return pb.GenerateStreamRequest(prompt=prompt, options=opts)


async def stream_generation(address: str, request, out=sys.stdout, token: str | None = None):
    """Send one GenerateStream request and print the committed text as it arrives; returns the final response."""
    import grpc

    from s2t.v1 import generation_pb2_grpc as pb_grpc

    metadata = [("authorization", f"Bearer {token}")] if token else None
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        final = None
        async for msg in stub.GenerateStream(request, metadata=metadata):
            if msg.HasField("delta"):
                out.write(msg.delta.text)
                out.flush()
            else:
                final = msg.final
        out.write("\n")
        return final


def print_stats(final, out=sys.stdout) -> None:
    from google.protobuf.json_format import MessageToDict

    from s2t.v1 import generation_pb2 as pb

    st = final.stats
    print(f"--- finish: {pb.FinishReason.Name(final.finish_reason)}; mode requested "
          f"{pb.Mode.Name(st.mode_requested)}, used {pb.Mode.Name(st.mode_used)}", file=out)
    print(f"--- {st.completion_tokens} tokens in {st.wall_s:.1f}s = {st.tokens_per_s:.2f} tok/s; "
          f"first token after {st.time_to_first_token_s:.1f}s", file=out)
    print(f"--- selector: {st.positions_checked} positions checked, {st.picks_changed} picks changed, "
          f"{st.llm_forwards} LLM forwards, {st.selector_calls} calls ({st.selector_failures} failed, "
          f"{st.resyncs} resyncs); {st.verified_tokens} tokens verified, {st.unverified_tokens} unverified, "
          f"{st.local_decisions} decided locally", file=out)
    if st.degraded_reason:
        print(f"--- degraded: {st.degraded_reason}", file=out)
    print(json.dumps(MessageToDict(st, preserving_proto_field_name=True)), file=out)


def cmd_generate(args) -> None:
    settings = _settings(args)
    address = args.address or f"{settings.worker.host}:{settings.worker.port}"
    token = settings.worker.auth_token.get_secret_value() if settings.worker.auth_token else None
    final = asyncio.run(stream_generation(address, _request(args.prompt, args), token=token))
    if final is not None:
        print_stats(final)


def cmd_run(args) -> None:
    """The main job: everything on this machine, one GSM8K test question through the client API."""
    from . import gsm8k
    from .stack import LocalStack

    settings = _settings(args)
    problem = gsm8k.load("test", args.problem, 1)[0]

    async def main():
        async with LocalStack(settings) as stack:
            print(f"[run] GSM8K test problem {problem['idx']} (gold answer {problem['gold']}):\n"
                  f"{problem['question']}\n", file=sys.stderr, flush=True)
            final = await stream_generation(stack.address, _request(problem["question"], args))
            print_stats(final)
            print(f"--- answer {gsm8k.extract(final.text)}, gold {problem['gold']}: "
                  f"{'correct' if gsm8k.is_correct(final.text, problem['gold']) else 'wrong'}")

    asyncio.run(main())


def cmd_collect(args) -> None:
    """GSM8K train rollouts of the SLM, every position labelled by a selector (started here unless --selector)."""
    from .collect import collect
    from .runtime import Engine, load_with

    settings = _settings(args)
    _fetch_needed(settings)
    ws, sel = settings.worker, settings.selector
    out_dir = Path(args.out) if args.out else settings.data_dir / "collect"
    stop = None
    address = args.selector
    if address is None:
        from llm_selector import serve_app

        print(f"[collect] starting the selector ({sel.model}) on Ray Serve; selection logs go to "
              f"{settings.selection_log_dir()}", file=sys.stderr, flush=True)
        address, stop = serve_app.start(settings), serve_app.stop
    try:
        engine = Engine(load_with(ws.model, settings.cache_dir, ws.runtime))
        summary = asyncio.run(collect(engine, address, sel.application if args.selector is None else (args.application or ""),
                          out_dir, args.problems, start=args.start, k=args.num_candidates,
                          max_new_tokens=args.max_new_tokens, max_positions=sel.max_positions, batch=args.batch,
                          system_prompt=ws.system_prompt, auth_token=ws.selector_auth_token, tls=ws.selector_tls))
    finally:
        if stop is not None:
            stop()
    summary["log_dir"] = str(settings.selection_log_dir()) if args.selector is None else None
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))


def _slm_identity(settings: Settings) -> tuple[Path, str, str]:
    """The worker's SLM, which S2T-Local trains: its directory, vocabulary hash and weights hash."""
    from .model_store import read_manifest, resolve_model
    from .vocab import vocab_hash_of_dir, weights_sha256

    path = resolve_model(settings.worker.model, settings.cache_dir)
    manifest = read_manifest(path) or {}
    return path, manifest.get("vocab_sha256") or vocab_hash_of_dir(path), weights_sha256(path)


def cmd_distill_groups(args) -> None:
    from distill.groups import read_groups, write_groups

    settings = _settings(args)
    log_dir = Path(args.log_dir) if args.log_dir else settings.selection_log_dir()
    vocab = weights = None
    if not args.any_vocabulary:  # the logs must come from this SLM: candidate ids and contexts are its own
        _, vocab, weights = _slm_identity(settings)
    summary = write_groups(read_groups(log_dir, vocab, weights, context_tail=args.context_tail), Path(args.out))
    print(json.dumps({**summary, "out": args.out, "log_dir": str(log_dir)}))


def cmd_distill(args) -> None:
    """Selection logs -> training groups (the top-tau positions by KL or entropy) -> S2T-Local adapter, evaluated, exported."""
    import dataclasses

    from distill.groups import LabelBy, read_groups, sessions, split_held_out, top_positions
    from distill.train import TrainConfig, train

    from .calibration import read_calibration

    settings = _settings(args)
    _fetch_needed(settings, ("worker",))
    log_dir = Path(args.log_dir) if args.log_dir else settings.selection_log_dir()
    base_dir, vocab, weights = _slm_identity(settings)
    groups = list(read_groups(log_dir, vocab, weights, context_tail=511))
    if not groups:
        raise SystemExit(f"no training groups in the closed segments under {log_dir}")
    logged = len(groups)
    label_by = LabelBy(args.label_by)
    groups = top_positions(groups, args.tau, label_by)
    train_groups, eval_groups = split_held_out(groups, args.eval_share)
    calibration = read_calibration(settings.calibration_file()) or {}
    entropy = calibration.get("entropy") or {f"{r:g}": v for r, v in settings.worker.thresholds.entropy.items()}
    config = TrainConfig(epochs=args.epochs, lr=args.lr, bin_lr=args.bin_lr, bin_init_std=args.bin_init_std,
                         rank=args.rank, alpha=2.0 * args.rank,
                         lora_layers=args.lora_layers, lora_trainable=not args.freeze_lora,
                         max_minutes=args.max_minutes, max_steps=args.max_steps,
                         eval_every=args.eval_every,
                         base_weights_sha256=weights, trigger_calibration={"entropy": entropy},
                         prior_weight_init=0.0 if args.paper_score else args.prior_weight,
                         prior_weight_trainable=not args.paper_score)
    out = Path(args.out) if args.out else settings.data_dir / "distill"
    print(f"[distill] {len(train_groups)} training and {len(eval_groups)} held-out groups "
          f"(top {args.tau:.0%} by {label_by.value} of {logged} logged positions) "
          f"from {log_dir}; base {base_dir.name}", file=sys.stderr, flush=True)
    summary = train(train_groups, eval_groups, base_dir, out, config, sessions(log_dir, vocab, weights))
    metrics = summary.get("metrics") or {}
    row = {"mode": "distill", "kind": "training", "groups": len(train_groups), "eval_groups": len(eval_groups),
           "wall_s": summary.get("wall_s"), "peak_rss_gb": round((summary.get("peak_rss_mb") or 0) / 1024, 2),
           "agreement_at_1": metrics.get("agreement_at_1"), "spearman": metrics.get("spearman"),
           "agreement_at_1_before": (summary.get("metrics_before") or {}).get("agreement_at_1"),
           "slm_top1_agreement": metrics.get("slm_top1_agreement"), "prior_weight": summary.get("prior_weight"),
           "steps": summary.get("steps"), "total_steps": summary.get("total_steps"), "stopped": summary.get("stopped"),
           "adapter": str(summary.get("adapter")), "tau": args.tau, "label_by": label_by.value, "config": dataclasses.asdict(config)}
    (out / "row.json").write_text(json.dumps(row, indent=1, default=str))
    print(json.dumps(row, default=str))


# -- logging --------------------------------------------------------------------------------------------------


class LogFormat(enum.Enum):
    """S2T_LOG_FORMAT: how log lines are written to stderr."""

    TEXT = "text"  # for people: time level logger: message
    JSON = "json"  # for log shippers: one JSON object per line


TEXT_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# What a log call may pass with extra= to tie its line to a request and a selector session.
LOG_CONTEXT_FIELDS = ("request_id", "session_id")


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, the request_id / session_id of
    the call's extra= when given, and the formatted exception if any."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
                 "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        for field in LOG_CONTEXT_FIELDS:
            value = getattr(record, field, None)
            if value:
                entry[field] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def log_handler(environ=os.environ) -> logging.Handler:
    """A stderr handler in the format S2T_LOG_FORMAT names (text, the default, or json)."""
    name = environ.get("S2T_LOG_FORMAT", LogFormat.TEXT.value).lower()
    try:
        fmt = LogFormat(name)
    except ValueError:
        raise SystemExit(f"S2T_LOG_FORMAT={name!r}: must be one of {[f.value for f in LogFormat]}") from None
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLogFormatter() if fmt is LogFormat.JSON else logging.Formatter(TEXT_LOG_FORMAT))
    return handler


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=os.environ.get("S2T_LOG_LEVEL", "WARNING").upper(), handlers=[log_handler()])
    parser = argparse.ArgumentParser(prog="s2t", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML configuration file (also $S2T_CONFIG)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override a setting, e.g. --set worker.block_size=4 (repeatable)")
    sub = parser.add_subparsers(dest="command", required=True)

    def gen_flags(p):
        p.add_argument("--mode", choices=[m.value for m in Mode], help="default: the worker's default_mode")
        p.add_argument("--max-new-tokens", type=int)
        p.add_argument("--block-size", type=int)
        p.add_argument("--trigger", choices=["always", "entropy", "margin", "kl"])
        p.add_argument("--trigger-rate", type=float)
        p.add_argument("--temperature", type=float, help="mode greedy: sample at this temperature (default 0: argmax)")
        p.add_argument("--top-p", type=float, help="with --temperature: nucleus sampling")
        p.add_argument("--seed", type=int, help="with --temperature: reproduce a sample (default: the worker picks one)")

    p = sub.add_parser("run", help="the main job on the embedded default models")
    p.add_argument("--problem", type=int, default=0, help="GSM8K test problem index")
    gen_flags(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("fetch-models", help="fetch and convert the embedded models")
    p.add_argument("models", nargs="*", help="registry names (default: all)")
    p.add_argument("--keep-gguf", action="store_true", help="keep the assembled GGUF files")
    p.set_defaults(func=cmd_fetch_models)

    p = sub.add_parser("calibrate", help="calibrate trigger thresholds on GSM8K train prompts")
    p.add_argument("--problems", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=384)
    p.add_argument("--no-llm", action="store_true", help="entropy and margin only (no KL table)")
    p.add_argument("--output", help="default: beside the models in the cache")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("serve-selector", help="run the selector")
    p.add_argument("--no-ray", action="store_true", help="a plain grpc.aio server instead of Ray Serve")
    p.set_defaults(func=cmd_serve_selector)

    p = sub.add_parser("serve-worker", help="run the worker")
    p.add_argument("--wait-for-selector", type=float, default=60.0, help="seconds to wait for the selector")
    p.set_defaults(func=cmd_serve_worker)

    p = sub.add_parser("generate", help="send a request to a running worker")
    p.add_argument("prompt")
    p.add_argument("--address", help="worker host:port (default from the config)")
    gen_flags(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("distill-groups", help="selection logs -> S2T-Local training groups")
    p.add_argument("--out", required=True, help="output JSON-lines file")
    p.add_argument("--log-dir", help="default: the selector's selection-log directory")
    p.add_argument("--context-tail", type=int, default=511)
    p.add_argument("--any-vocabulary", action="store_true", help="do not check the log against the worker's SLM")
    p.set_defaults(func=cmd_distill_groups)

    p = sub.add_parser("collect", help="label SLM rollouts of GSM8K train problems with the selector (S2T-Local data)")
    p.add_argument("--problems", type=int, default=100, help="GSM8K train problems")
    p.add_argument("--start", type=int, default=0, help="first train problem index")
    p.add_argument("--num-candidates", type=int, default=16, help="K per labelled position (paper: 16 for data)")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--batch", type=int, default=16, help="problems rolled out and labelled together")
    p.add_argument("--out", help="progress and summary (default: <data dir>/collect); rerun to resume")
    p.add_argument("--selector", help="host:port of a running selector (default: start one here)")
    p.add_argument("--application", help="Ray Serve application of --selector")
    p.set_defaults(func=cmd_collect)

    p = sub.add_parser("distill", help="selection logs -> an S2T-Local adapter (train, evaluate, export)")
    p.add_argument("--log-dir", help="default: the selector's selection-log directory")
    p.add_argument("--out", help="checkpoints, summary and the exported adapter (default: <data dir>/distill)")
    p.add_argument("--tau", type=float, default=0.10, help="train on the top tau of logged positions (1 = all)")
    p.add_argument("--label-by", choices=["kl", "entropy"], default="kl",
                   help="rank positions by the selector's KL (the paper's) or by the SLM's entropy (the positions "
                        "the worker's LLM-free trigger re-ranks at in s2t-local)")
    p.add_argument("--eval-share", type=float, default=0.10, help="share of sessions held out for evaluation")
    p.add_argument("--epochs", type=int, default=3)
    # The paper's 5e-5 is for 4 groups per optimizer step; one step here is a session's row (~15 groups at
    # tau 10 %), so about 4x fewer steps per epoch: 1e-4 (square-root batch scaling).
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--bin-lr", type=float, help="learning rate of the score-bin rows (default: --lr)")
    p.add_argument("--bin-init-std", type=float, default=0.0,
                   help="noise added to the initial score-bin rows (Qwen2.5's reserved rows are identical, which "
                        "leaves the LoRA without gradient until they differ)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = 2 x rank)")
    p.add_argument("--lora-layers", type=int, help="LoRA on the top N layers only (default: all)")
    p.add_argument("--freeze-lora", action="store_true",
                   help="train only the score-bin rows and the prior weight, the LoRA left at zero (the control "
                        "that measures what the LoRA adds)")
    p.add_argument("--prior-weight", type=float, default=1.0,
                   help="initial weight of the SLM prior: score = expected bin + w log p_SLM (w is learned)")
    p.add_argument("--paper-score", action="store_true",
                   help="the paper's score exactly: expected bin value only (no SLM prior)")
    p.add_argument("--max-minutes", type=float, help="stop, checkpoint and export after this long")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--eval-every", type=int,
                   help="optimizer steps between held-out evaluations (default: before and after training only); "
                        "the curve lands in <out>/summary.json")
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("config", help="print the effective configuration")
    p.set_defaults(func=cmd_config)

    args = parser.parse_args(argv)
    from .model_store import ModelStoreError

    try:
        args.func(args)
    except (ConfigError, ModelStoreError, FileNotFoundError) as e:  # the message says what to do
        raise SystemExit(f"s2t {args.command}: {e}") from None


if __name__ == "__main__":
    main()
