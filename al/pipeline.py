"""Associated Learning trained as a pipeline: one process per group of components, on ``torch.distributed``.

    torchrun --nproc-per-node 2 -m al.pipeline --model mlp --dataset mnist --epochs 3
    torchrun --nproc-per-node 2 -m al.pipeline --model lstm --train-file train.tsv --test-file test.tsv

Each rank (stage) owns a contiguous group of components (``--split``, default: balanced by parameter count
without embeddings) and its own optimizers. Stage 0 reads the data; every stage trains its components on a
batch, then sends the detached ``(s, t)``, the labels and (text) the mask to the next stage with ``isend`` and
goes on to the next batch while that stage trains on this one (and receives the next one in the background). No gradient ever flows back. Evaluation takes
the shortcut path: ``s`` runs forward through the stages' encoders, the label decoders of the earlier stages
travel with it (small ``label_dim`` layers), and the last stage applies ``b_L``, ``h_L ... h_1``.

With the same seed and batch order the trained weights equal those of ``python -m al.train --method al``
(same data, model and optimizer options). ``--checkpoint-dir`` with ``--checkpoint-every N`` writes per-stage
checkpoints at the same batch indices; ``--resume`` continues from the newest index every stage has. A stage
whose peer dies or stops answering for ``--timeout`` seconds exits with an error naming that peer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from itertools import islice
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from meprop.data import save_atomic

from .cli import add_common_arguments, check_common_arguments, parse_with_preset
from .components import train_components
from .config import ARCH_KEYS, PipelineConfig
from .models import ALModel
from .p2p import Kind, Message, Receiver, Sender, StageFailure
from .stage_checkpoints import StageCheckpoints, checkpoints_to_keep, newest_common_step
from .training import build_data, make_loader, make_model, unpack_batch

__all__ = ["main", "parse_args", "balanced_split", "compute_weight", "Stage"]

EVAL_SPLITS = ("validation", "test")  # EVAL_BEGIN/EVAL_END aux codes
ORDER_KEYS = ("seed", "batch_size", "train_limit", "dataset", "train_file")  # fix the batch order


def parse_args(argv=None) -> PipelineConfig:
    p = argparse.ArgumentParser(prog="torchrun --nproc-per-node STAGES -m al.pipeline",
                                description=__doc__.split("\n\n")[0])
    opt = add_common_arguments(p)
    opt.add_argument("--threads", type=int, default=1, help="torch threads per stage (default 1)")
    opt.add_argument("--max-batches", type=int, help="stop after this many training batches in all")
    opt.add_argument("--no-eval", action="store_true", help="skip the per-epoch and final evaluations")
    opt.add_argument("--results", help="the last stage writes a JSON summary here")
    opt.add_argument("--save-model", help="the last stage writes the whole ALModel's state_dict here")
    opt.add_argument("--log-every", type=int, default=100, help="progress line every N batches (0: none)")
    opt.add_argument("--warmup-batches", type=int, default=10,
                     help="training batches left out of the measured throughput")
    pipe = p.add_argument_group("pipeline")
    pipe.add_argument("--split", help="components per stage, comma-separated, e.g. 2,1 (default: balanced)")
    pipe.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: GPU LOCAL_RANK")
    pipe.add_argument("--backend", choices=("gloo", "nccl"), help="default: nccl with --device cuda, else gloo")
    pipe.add_argument("--timeout", type=float, default=120.0,
                      help="seconds a stage waits on a peer before it stops with an error (process-group timeout)")
    pipe.add_argument("--checkpoint-dir", help="per-stage checkpoints go to DIR/stage-R-of-S/")
    pipe.add_argument("--checkpoint-every", type=int,
                      help="checkpoint every N batches (default: one epoch) and when training ends")
    pipe.add_argument("--resume", action="store_true",
                      help="continue from the newest batch index that every stage has checkpointed")
    args = parse_with_preset(p, argv)
    check_common_arguments(p, args)
    args.method = "al"
    for name in ("threads", "max_batches", "checkpoint_every"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup_batches < 0 or args.log_every < 0:
        p.error("--warmup-batches and --log-every must be >= 0")
    if args.timeout <= 0:
        p.error("--timeout must be > 0")
    if args.resume and not args.checkpoint_dir:
        p.error("--resume needs --checkpoint-dir")
    if args.checkpoint_every and not args.checkpoint_dir:
        p.error("--checkpoint-every needs --checkpoint-dir")
    if args.backend == "nccl" and args.device != "cuda":
        p.error("--backend nccl needs --device cuda")
    return PipelineConfig.from_namespace(args)


# ------------------------------------------------------------------------------------------- stage layout

def compute_weight(component: nn.Module) -> int:
    """A component's share of the work: its parameter count without embedding tables (lookups are cheap)."""
    lookup = {id(p) for m in component.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    return sum(p.numel() for p in component.parameters() if id(p) not in lookup)


def balanced_split(weights, stages: int) -> list[int]:
    """Components per stage: the contiguous partition of ``weights`` into ``stages`` non-empty groups whose
    heaviest group is lightest (ties: the first such partition in lexicographic order of group sizes)."""
    n = len(weights)
    if not 1 <= stages <= n:
        raise ValueError(f"stages must be in [1, {n}] (one component at least per stage), got {stages}")
    prefix = [0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    # best[j][i]: (heaviest group, sizes) splitting the first i components into j groups.
    best = [{0: (0, [])}] + [{} for _ in range(stages)]
    for j in range(1, stages + 1):
        for i in range(j, n - (stages - j) + 1):
            options = [(max(best[j - 1][k][0], prefix[i] - prefix[k]), best[j - 1][k][1] + [i - k])
                       for k in range(j - 1, i) if k in best[j - 1]]
            best[j][i] = min(options)
    return best[stages][n][1]


def parse_split(text: str | None, model: ALModel, stages: int) -> list[int]:
    if text is None:
        return balanced_split([compute_weight(c) for c in model.components], stages)
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"--split must be comma-separated integers, got {text!r}") from None
    if len(counts) != stages or min(counts) < 1 or sum(counts) != model.num_components:
        raise ValueError(f"--split {text}: need {stages} counts >= 1 (one per stage) summing to the "
                         f"{model.num_components} components")
    return counts


def _state_tensors(modules) -> list[torch.Tensor]:
    return [t for m in modules for t in m.state_dict().values()]


def _load_state_tensors(modules, tensors) -> None:
    """Loads ``tensors`` (in :func:`_state_tensors` order) into ``modules``."""
    tensors = list(tensors)
    for m in modules:
        keys = list(m.state_dict())
        if len(tensors) < len(keys):
            raise ValueError("state message holds fewer tensors than the modules need")
        m.load_state_dict(dict(zip(keys, tensors[: len(keys)])))
        tensors = tensors[len(keys):]
    if tensors:
        raise ValueError(f"state message holds {len(tensors)} tensors more than the modules need")


# ------------------------------------------------------------------------------------------------ a stage

class Stage:
    """Components ``[begin, end)`` of ``model`` with one Adam optimizer each: what one process trains.

    :meth:`handle` takes one message (from the data on stage 0, from the previous stage otherwise) and
    returns the message for the next stage.
    """

    def __init__(self, model: ALModel, begin: int, end: int, rank: int, args: PipelineConfig, checkpoints):
        self.model, self.begin, self.end, self.rank, self.args = model, begin, end, rank, args
        self.components = list(model.components[begin:end])
        self.optimizers = model.make_adam(args.lr, args.autoencoder_lr, begin, end)  # as al.train
        self.first, self.last = begin == 0, end == model.num_components
        self.checkpoints = checkpoints
        self.checkpoint_every = args.checkpoint_every
        self.step, self.saved_step = 0, None
        self.closed_epoch = 0  # the last epoch whose end (losses, evaluation) this stage has handled
        self.loss_sums, self.loss_batches = [0.0] * (2 * len(self.components)), 0
        self.history = []  # last stage: one entry per epoch, as in al.train
        self.test = None  # last stage: final test result
        self.eval_correct = self.eval_total = 0
        self.batches_this_run = 0
        self.timed_seconds, self.timed_samples, self.timed_batches = 0.0, 0, 0
        self.previous_train_end = None

    def log(self, text: str) -> None:
        print(f"[stage {self.rank}] {text}", file=sys.stderr, flush=True)

    # -- training
    def _train_batch(self, message: Message) -> Message:
        s, t, labels, *mask = message.tensors
        mask = mask[0] if mask else None
        s, t, values = train_components(self.components, self.optimizers, s, t, labels, mask, self.args.clip)
        self.loss_sums = [a + b for a, b in zip(self.loss_sums, values)]
        self.loss_batches += 1
        self.step = message.step
        self._measure(labels.shape[0])
        if self.checkpoint_every and self.step % self.checkpoint_every == 0:
            self.save()
        if self.last and self.args.log_every and self.step % self.args.log_every == 0:
            rate = f", {self.timed_samples / self.timed_seconds:.0f} samples/s" if self.timed_seconds else ""
            self.log(f"epoch {message.epoch} step {self.step}: losses {[round(v, 4) for v in values]}{rate}")
        return message._replace(tensors=(s, t, labels) + (() if mask is None else (mask,)))

    def _measure(self, samples: int) -> None:
        """Throughput over consecutive training batches after the warm-up (pauses for evaluation left out)."""
        now = time.perf_counter()
        self.batches_this_run += 1
        if self.previous_train_end is not None and self.batches_this_run > self.args.warmup_batches:
            self.timed_seconds += now - self.previous_train_end
            self.timed_samples += samples
            self.timed_batches += 1
        self.previous_train_end = now

    def _epoch_end(self, message: Message) -> Message:
        earlier = message.tensors[0].cpu() if message.tensors else torch.zeros(0, dtype=torch.float64)
        means = torch.tensor([v / max(self.loss_batches, 1) for v in self.loss_sums], dtype=torch.float64)
        losses = torch.cat([earlier, means])
        self.loss_sums, self.loss_batches = [0.0] * len(self.loss_sums), 0
        self.closed_epoch = message.epoch
        if self.last:
            entry = {"epoch": message.epoch, "associated_loss": losses[0::2].tolist(),
                     "autoencoder_loss": losses[1::2].tolist()}
            self.history.append(entry)
            self.log(f"epoch {message.epoch}: losses {json.dumps(entry)}")
        return message._replace(tensors=(losses,))

    # -- evaluation (shortcut path)
    def _eval_begin(self, message: Message) -> Message:
        for component in self.components:
            component.eval()
        self.eval_correct = self.eval_total = 0
        decoders = [c.label_decoder for c in self.model.components[: self.begin]]
        if self.last:
            _load_state_tensors(decoders, message.tensors)
            return message
        return message._replace(tensors=tuple(message.tensors) + tuple(_state_tensors(
            c.label_decoder for c in self.components)))

    @torch.no_grad()
    def _eval_batch(self, message: Message) -> Message:
        s, labels, *mask = message.tensors
        mask = mask[0] if mask else None
        for component in self.components:
            s = component.encoder(s, mask)
        if self.last:
            scores = self.model.decode(self.components[-1].bridge(s, mask), self.model.num_components)
            self.eval_correct += int((scores.argmax(dim=1) == labels).sum())
            self.eval_total += labels.numel()
        return message._replace(tensors=(s, labels) + (() if mask is None else (mask,)))

    def _eval_end(self, message: Message) -> Message:
        for component in self.components:
            component.train()
        if self.last:
            split, accuracy = EVAL_SPLITS[message.aux], self.eval_correct / max(self.eval_total, 1)
            if split == "test" and message.epoch == 0:
                self.test = {"accuracy": accuracy, "examples": self.eval_total}
            else:
                self.history[-1][f"{split}_accuracy"] = accuracy
                self.log(f"epoch {message.epoch}: {split} accuracy {accuracy:.4f}")
        return message

    def _save_model(self, message: Message) -> Message:
        if self.last:
            _load_state_tensors(self.model.components[: self.begin], message.tensors)
            save_atomic(self.model.state_dict(), self.args.save_model)
            return message
        return message._replace(tensors=tuple(message.tensors) + tuple(_state_tensors(self.components)))

    def handle(self, message: Message) -> Message:
        kind = message.kind
        if kind == Kind.TRAIN:
            return self._train_batch(message)
        self.previous_train_end = None
        if kind == Kind.EPOCH_END:
            return self._epoch_end(message)
        if kind == Kind.TRAIN_END:
            if self.checkpoint_every and self.saved_step != self.step:
                self.save()
            return message
        if kind == Kind.EVAL_BEGIN:
            return self._eval_begin(message)
        if kind == Kind.EVAL:
            return self._eval_batch(message)
        if kind == Kind.EVAL_END:
            return self._eval_end(message)
        if kind == Kind.SAVE:
            return self._save_model(message)
        return message  # STOP

    # -- checkpoints
    def state(self) -> dict:
        return {
            "step": self.step,
            "components": [self.begin, self.end],
            "arch": {key: getattr(self.args, key) for key in ARCH_KEYS},
            "order": {key: getattr(self.args, key) for key in ORDER_KEYS},
            "model": [c.state_dict() for c in self.components],
            "optimizers": [o.state_dict() for o in self.optimizers],
            "torch_rng": torch.get_rng_state(),
            "loss_sums": self.loss_sums,
            "loss_batches": self.loss_batches,
            "closed_epoch": self.closed_epoch,
            "history": self.history,
        }

    def save(self) -> None:
        self.checkpoints.save(self.step, self.state())
        self.saved_step = self.step

    def restore(self, state: dict) -> None:
        where = f"--resume: {self.checkpoints.path(state['step'])}"
        if state["components"] != [self.begin, self.end]:
            raise ValueError(f"{where} holds components {state['components']}, this stage has "
                             f"[{self.begin}, {self.end}] (another --split?)")
        for group in ("arch", "order"):
            changed = [k for k, v in state[group].items() if getattr(self.args, k) != v]
            if changed:
                raise ValueError(f"{where} was trained with other settings: {changed}")
        for component, saved in zip(self.components, state["model"]):
            component.load_state_dict(saved)
        for optimizer, saved in zip(self.optimizers, state["optimizers"]):
            optimizer.load_state_dict(saved)
        torch.set_rng_state(state["torch_rng"])
        self.loss_sums, self.loss_batches = list(state["loss_sums"]), state["loss_batches"]
        self.history, self.closed_epoch = state["history"], state["closed_epoch"]
        self.step = self.saved_step = state["step"]


# ------------------------------------------------------------------------------------------------ driving

def drive(stage: Stage, datasets, args, emit, device) -> None:
    """Stage 0: turns the data into messages (from batch ``stage.step`` on) and passes each to ``emit``."""
    num_classes = stage.model.num_classes
    batches_per_epoch = len(make_loader(datasets["train"], args, True, 1))
    total = args.epochs * batches_per_epoch
    if args.max_batches is not None:
        total = min(total, args.max_batches)
    step = stage.step
    epoch, skip = step // batches_per_epoch + 1, step % batches_per_epoch
    if step and skip == 0 and stage.closed_epoch < step // batches_per_epoch:
        epoch, skip = epoch - 1, batches_per_epoch  # resumed at an epoch's last batch, before that epoch's end
    monitor = "validation" if "validation" in datasets else "test"

    def evaluate(split: str, epoch: int) -> None:
        code = EVAL_SPLITS.index(split)
        emit(Message(Kind.EVAL_BEGIN, epoch, step, code))
        for batch in make_loader(datasets[split], args, shuffle=False):
            x, mask, labels = (None if v is None else v.to(device) for v in unpack_batch(batch))
            emit(Message(Kind.EVAL, epoch, step, code, (x, labels) + (() if mask is None else (mask,))))
        emit(Message(Kind.EVAL_END, epoch, step, code))

    while epoch <= args.epochs:
        if skip < batches_per_epoch and step < total:
            for batch in islice(make_loader(datasets["train"], args, True, epoch), skip, None):
                x, mask, labels = (None if v is None else v.to(device) for v in unpack_batch(batch))
                t = F.one_hot(labels, num_classes).float()
                step += 1
                emit(Message(Kind.TRAIN, epoch, step, 0, (x, t, labels) + (() if mask is None else (mask,))))
                if step == total:
                    break
        if step == epoch * batches_per_epoch:
            emit(Message(Kind.EPOCH_END, epoch, step))
            if not args.no_eval:
                evaluate(monitor, epoch)
        if step >= total:
            break
        epoch, skip = epoch + 1, 0
    emit(Message(Kind.TRAIN_END, epoch, step))
    if not args.no_eval:
        evaluate("test", 0)
    if args.save_model:
        emit(Message(Kind.SAVE, epoch, step))
    emit(Message(Kind.STOP, epoch, step))


def receive_stream(stage: Stage, receiver: Receiver, sender: Sender | None, device: torch.device) -> None:
    """Stages after the first: handles the previous stage's messages until STOP. The next message is received
    by a helper thread while this one is handled, so the transfer (which needs both processes' I/O threads to
    get a core) does not wait for the end of this stage's compute; at most one message is received ahead."""
    initializer = (lambda: torch.cuda.set_device(device)) if device.type == "cuda" else None
    prefetch = ThreadPoolExecutor(1, thread_name_prefix="al-pipeline-recv", initializer=initializer)
    try:
        pending = prefetch.submit(receiver.recv)
        while True:
            message = pending.result()
            if message.kind != Kind.STOP:
                pending = prefetch.submit(receiver.recv)
            out = stage.handle(message)
            if sender:
                sender.send(out)
            if message.kind == Kind.STOP:
                break
    finally:
        prefetch.shutdown(wait=False, cancel_futures=True)


def _resume_step(checkpoints: StageCheckpoints, args, world: int) -> int | None:
    """The batch index to resume from (None: start afresh), agreed by all stages."""
    checkpoints.check_layout()
    local = checkpoints.steps()
    everyone = [None] * world
    if world > 1:
        dist.all_gather_object(everyone, local)
    else:
        everyone = [local]
    if not any(everyone):
        return None
    if not args.resume:
        raise ValueError(f"--checkpoint-dir {checkpoints.root} already holds checkpoints (batch indices per stage: "
                         f"{everyone}); pass --resume to continue from them or use an empty folder")
    step = newest_common_step(everyone)
    if step is None:
        raise ValueError(f"--resume: no batch index is checkpointed by every stage in {checkpoints.root} "
                         f"(per stage: {everyone})")
    return step


def run(args) -> dict | None:
    """Trains this process's stage; returns the summary on the last stage (None elsewhere)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.set_num_threads(args.threads)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: CUDA is not available")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    backend = args.backend or ("nccl" if args.device == "cuda" else "gloo")
    if world > 1:
        dist.init_process_group(backend, timeout=timedelta(seconds=args.timeout))
    wire = device if backend == "nccl" else torch.device("cpu")

    torch.manual_seed(args.seed)  # as in al.train: the same initial weights
    datasets, names, vocab, vectors, _ = build_data(args)
    model = make_model(args, len(names), vocab, vectors).to(device)
    counts = parse_split(args.split, model, world)
    begin = sum(counts[:rank])
    end = begin + counts[rank]
    torch.manual_seed(args.seed * 1000 + 1 + rank)  # each stage its own random stream (dropout)

    checkpoints = None
    if args.checkpoint_dir:
        batches_per_epoch = len(make_loader(datasets["train"], args, True, 1))
        args.checkpoint_every = args.checkpoint_every or batches_per_epoch
        keep = checkpoints_to_keep(args.checkpoint_every, world)
        checkpoints = StageCheckpoints(args.checkpoint_dir, rank, world, keep)
        checkpoints.remove_partial_writes()
    stage = Stage(model, begin, end, rank, args, checkpoints)
    stage.log(f"rank {rank}/{world} ({backend}, {device}, {args.threads} thread(s)): components [{begin}, {end}) "
              f"of {model.num_components}, split {counts}")
    resumed_from = _resume_step(checkpoints, args, world) if checkpoints else None
    if args.resume and resumed_from is None:
        stage.log(f"--resume: no checkpoints in {args.checkpoint_dir}; starting from the first batch")
    if resumed_from is not None:
        stage.restore(checkpoints.load(resumed_from))
        checkpoints.discard_after(resumed_from)
        stage.log(f"resuming after batch {resumed_from}")

    sender = Sender(rank, rank + 1, wire) if not stage.last else None
    started = time.perf_counter()
    if stage.first:
        def emit(message):
            out = stage.handle(message)
            if sender:
                sender.send(out)
        drive(stage, datasets, args, emit, device)
    else:
        receive_stream(stage, Receiver(rank, rank - 1, wire, device), sender, device)
    if sender:
        sender.wait()
    seconds = time.perf_counter() - started
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    if not stage.last:
        return None
    return _summary(stage, args, datasets, counts, resumed_from, seconds)


def _summary(stage: Stage, args, datasets, counts, resumed_from, seconds) -> dict:
    throughput = {
        "samples_per_s": stage.timed_samples / stage.timed_seconds if stage.timed_seconds else None,
        "timed_batches": stage.timed_batches,
        "warmup_batches": args.warmup_batches,
        "measured_on": "last stage, consecutive training batches after the warm-up",
    }
    summary = {
        "test_accuracy": stage.test["accuracy"] if stage.test else None,
        "test_examples": stage.test["examples"] if stage.test else None,
        "history": stage.history,
        "train_examples": len(datasets["train"]),
        "batches": stage.step,
        "resumed_from": resumed_from,
        "split": counts,
        "parameters": sum(p.numel() for p in stage.model.parameters()),
        "seconds_this_session": round(seconds, 2),
        "throughput": throughput,
        "config": {k: v for k, v in args.to_dict().items() if k not in ("results", "save_model")},
    }
    if stage.test:
        print(f"test accuracy: {stage.test['accuracy']:.4f} ({stage.test['examples']} examples)")
    if throughput["samples_per_s"]:
        print(f"training throughput: {throughput['samples_per_s']:.1f} samples/s over {stage.timed_batches} batches")
    if args.results:
        Path(args.results).parent.mkdir(parents=True, exist_ok=True)
        Path(args.results).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv=None) -> dict | None:
    return run(parse_args(argv))


if __name__ == "__main__":
    arguments = parse_args()
    try:
        run(arguments)
    except StageFailure as failure:
        print(f"al.pipeline: {failure}", file=sys.stderr, flush=True)
        os._exit(1)  # not sys.exit: tearing the process group down could wait on the dead peer
    except BaseException:
        if int(os.environ.get("WORLD_SIZE", "1")) == 1:
            raise
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
