"""Training the paper's model (and ordinary TransformerLens models) on the n-gram task (PAPER.md §3, §7).

A run is a list of stages. Each stage names the parameter groups it moves (``"copier_position"``,
``"copier_token"``, ``"selector"``, ``"classifier"`` or ``"all"``), its optimizer, learning rate and number
of steps; the paper's three-stage analysis is C -> W -> a, its experiments train everything jointly.

Data: by default every step draws fresh sequences, seeded by (run seed, step), so a run is deterministic on
CPU and a resumed run continues exactly where an uninterrupted one would be. ``data="fixed"`` reuses one
fixed set for epochs (the authors' setting). Loss: the true log-loss -log p(target) (default) or the
authors' ``"legacy"`` loss, which feeds the output probability vector through a second softmax
cross-entropy (PAPER.md §8). Objective: ``"last"`` (the paper: only the token after the context) or
``"all"`` (every position from its strict past).

Every ``record_every`` steps the run records, on a fixed evaluation batch: the loss, the excess loss over
the Bayes predictor, the classifier scale a, the selector shares per subset, the copier weights, the
leading subset (and the lags its heads copy), and the theory's predicted subset (``ih_circuits.history`` defines
the table). The paper's runs by name are in ``ih_circuits.presets``.
"""

from __future__ import annotations

import json
import math
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from ih_circuits.adapters import white_box
from ih_circuits.chain import validate_lags
from ih_circuits.checkpoint import atomic_directory, check_fields, open_save, read_json
from ih_circuits.checks import check_int, check_real
from ih_circuits.history import history_columns, read_history, subset_column, weight_column
from ih_circuits.memory import items_per_chunk
from ih_circuits.model import IHTransformer
from ih_circuits.ordinary import RECIPE_FILE, load_ordinary_transformer, model_class, save_ordinary_transformer
from ih_circuits.predictors import last_position_nll, next_token_nll
from ih_circuits.seeds import derive_seed
from ih_circuits.task import NGramTask
from ih_circuits.theory import task_prediction

RUN_KIND = "TrainingRun"

# Bytes per [query, key] entry of one sequence in an evaluation forward: float32 scores, pattern and products for
# a few heads or subsets (the paper's model at H = 3, D = 2 holds about a dozen such tensors).
ATTENTION_BYTES_PER_ENTRY = 64

GROUPS = ("copier_position", "copier_token", "selector", "classifier", "all")
OPTIMIZERS = ("sgd", "adam")
# The largest learning rate torch's optimizers accept for float32 parameters (the float32 maximum).
MAX_LR = float(torch.finfo(torch.float32).max)


@dataclass(frozen=True)
class Stage:
    """One phase of training.

    Attributes:
        groups: parameter groups that move; the rest stay frozen.
        steps: optimizer steps in this stage (>= 0).
        lr: learning rate (> 0).
        optimizer: ``"sgd"`` (plain gradient descent, the paper's) or ``"adam"``.
        name: a label for the history table.
    """

    groups: tuple[str, ...] = ("all",)
    steps: int = 100
    lr: float = 1.0
    optimizer: str = "sgd"
    name: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "groups", tuple(self.groups))
        if not self.groups or any(g not in GROUPS for g in self.groups):
            raise ValueError(f"groups must be a non-empty subset of {GROUPS}; got {self.groups!r}")
        check_int(self.steps, "steps", 0)
        check_real(self.lr, "lr", 0.0, MAX_LR, low_open=True)
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}; got {self.optimizer!r}")


@dataclass(frozen=True)
class TrainConfig:
    """How to train: stages, data, objective and bookkeeping.

    Attributes:
        stages: the stages, run in order.
        batch_size: sequences per step.
        objective: ``"last"`` (the paper's) or ``"all"``.
        loss: ``"log"`` (true log-loss) or ``"legacy"`` (the authors' double softmax, PAPER.md §8).
        data: ``"fresh"`` (new sequences every step) or ``"fixed"`` (``dataset_size`` sequences, epochs).
        dataset_size: size of the fixed set.
        eval_size: sequences in the fixed evaluation batch.
        record_every: record the trajectory every this many steps (and at the first and last step).
        seed: one seed; data, evaluation and shuffling streams are derived from it.
        device: where training runs.
    """

    stages: tuple[Stage, ...] = (Stage(),)
    batch_size: int = 1024
    objective: str = "last"
    loss: str = "log"
    data: str = "fresh"
    dataset_size: int = 10_000
    eval_size: int = 2048
    record_every: int = 10
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", tuple(self.stages))
        if not self.stages or not all(isinstance(s, Stage) for s in self.stages):
            raise ValueError("stages must be a non-empty sequence of Stage")
        for name in ("batch_size", "dataset_size", "eval_size", "record_every"):
            check_int(getattr(self, name), name, 1)
        if self.objective not in ("last", "all"):
            raise ValueError(f"objective must be 'last' or 'all'; got {self.objective!r}")
        if self.loss not in ("log", "legacy"):
            raise ValueError(f"loss must be 'log' or 'legacy'; got {self.loss!r}")
        if self.data not in ("fresh", "fixed"):
            raise ValueError(f"data must be 'fresh' or 'fixed'; got {self.data!r}")
        check_int(self.seed, "seed", 0, 2**63 - 1, high_text="2**63 - 1")

    @property
    def total_steps(self) -> int:
        return sum(stage.steps for stage in self.stages)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["stages"] = [asdict(stage) for stage in self.stages]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Inverse of ``to_dict``; every field (and every stage field) must be present and valid."""
        check_fields(data, set(cls.__dataclass_fields__), "TrainConfig")
        if not isinstance(data["stages"], list):
            raise ValueError(f"TrainConfig stages must be a list; got {data['stages']!r}")
        stages = []
        for index, stage in enumerate(data["stages"]):
            check_fields(stage, set(Stage.__dataclass_fields__), f"TrainConfig stage {index}")
            if not isinstance(stage["groups"], list):
                raise ValueError(f"TrainConfig stage {index} groups must be a list; got {stage['groups']!r}")
            stages.append(Stage(**{**stage, "groups": tuple(stage["groups"])}))
        return cls(**{**data, "stages": tuple(stages)})


def legacy_loss(probs: Float[Tensor, "batch d_vocab"], targets: Int[Tensor, " batch"]) -> Float[Tensor, " batch"]:
    """The authors' loss: cross-entropy of softmax(p), i.e. -p_y + log sum_e exp(p_e) (PAPER.md §8).

    Its values are not log-losses and never reach 0: with p one-hot on the target it is log(1 + (d-1)/e).
    """
    return F.cross_entropy(probs, targets, reduction="none")


def parameter_groups(model: nn.Module, groups: Sequence[str]) -> list[nn.Parameter]:
    """The parameters a stage moves. Groups other than ``"all"`` need an ``IHTransformer``."""
    if "all" in groups:
        return list(model.parameters())
    ours = white_box(model)
    if ours is None:
        raise ValueError(f"parameter groups {tuple(groups)} exist only for IHTransformer; use groups=('all',)")
    copier = ours.copier
    table = {
        "copier_position": [copier.w_pos],
        "copier_token": [copier.W_QK, copier.W_V] if ours.config.copier == "full" else [],
        "selector": [ours.selector.c],
        "classifier": [ours.classifier.a],
    }
    chosen = [p for g in groups for p in table[g]]
    if not chosen:
        raise ValueError(f"groups {tuple(groups)} select no parameters of this model (copier={ours.config.copier!r})")
    return chosen


def query_log_probs(model: nn.Module, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch d_vocab"]:
    """Log-probabilities of the last token from the query row T-2.

    ``IHTransformer`` evaluates that row alone; any other model (an ordinary TransformerLens model returning
    logits) runs in full and is sliced.
    """
    ours = white_box(model)
    if ours is not None:
        return ours.query_log_probs(tokens)
    return torch.log_softmax(model(tokens)[:, -2], dim=-1)


def every_row_log_probs(model: nn.Module, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_vocab"]:
    """Log-probabilities of the next token at every row 0..T-1 (``IHTransformer`` returns them already)."""
    output = model(tokens)
    return output if white_box(model) is not None else torch.log_softmax(output, dim=-1)


def objective_loss(model: nn.Module, tokens: Int[Tensor, "batch pos"], objective: str, loss: str) -> Tensor:
    """Mean training loss over the supervised rows: the query row (``"last"``) or every row but the final one."""
    if objective == "last":
        rows, targets = query_log_probs(model, tokens)[:, None], tokens[:, -1:]
    else:
        rows, targets = every_row_log_probs(model, tokens)[:, :-1], tokens[:, 1:]
    if loss == "legacy":
        return legacy_loss(rows.exp().flatten(0, 1), targets.flatten()).mean()
    return -rows.gather(-1, targets[..., None]).mean()


@torch.no_grad()
def chunked_loss(model: nn.Module, tokens: Int[Tensor, "batch pos"], objective: str) -> float:
    """Mean log-loss over ``tokens``, evaluated in chunks of sequences sized so that one chunk's attention
    tensors take about ``memory.CHUNK_BYTES``: [pos, pos] per head and intermediate, or one query row
    when ``IHTransformer`` evaluates the last position alone."""
    n_sequences, n_pos = tokens.shape
    query_rows = 1 if objective == "last" and white_box(model) is not None else n_pos
    chunk = items_per_chunk(n_sequences, ATTENTION_BYTES_PER_ENTRY * query_rows * n_pos)
    total = 0.0
    for start in range(0, n_sequences, chunk):
        part = tokens[start : start + chunk]
        total += float(objective_loss(model, part, objective, "log")) * part.shape[0]
    return total / n_sequences


@dataclass
class TrainingRun:
    """A model, its task, how it was trained, and the recorded trajectory.

    Attributes:
        model, task, config: what was trained, on what, and how.
        history: one row per recorded step (columns ``step, stage, loss, eval_loss, bayes_loss,
            excess_loss, a, leading_subset, leading_lags, predicted_lags``, one ``share[...]`` column per
            selector subset and ``w[h,m]`` copier weights) for ``IHTransformer``; loss columns only
            otherwise.
        step: optimizer steps taken so far.
        interrupted: whether training stopped on KeyboardInterrupt.
        predicted_lags: the theory's predicted parent set for the task (argmax I~, |S| <= D;
            ``theory.task_prediction(task, D, window).best``, whose ``lags`` also lists the sets tied with it).
    """

    model: nn.Module
    task: NGramTask
    config: TrainConfig
    history: pd.DataFrame = field(default_factory=pd.DataFrame)
    step: int = 0
    interrupted: bool = False
    predicted_lags: tuple[int, ...] | None = None
    optimizer_state: dict[str, Any] | None = None

    def __repr__(self) -> str:
        last = self.history.iloc[-1] if len(self.history) else None
        summary = "" if last is None else f", loss={last['eval_loss']:.4f}, excess={last['excess_loss']:.4f}"
        lead = "" if last is None or "leading_lags" not in last else f", leading lags={last['leading_lags']}"
        return (
            f"TrainingRun(step={self.step}/{self.config.total_steps}{summary}{lead}, "
            f"parents={self.task.parents}, predicted={self.predicted_lags}, interrupted={self.interrupted})"
        )

    @property
    def finished(self) -> bool:
        return self.step >= self.config.total_steps

    def resume(self, *, quiet: bool = False, callback: Callable[[TrainingRun], None] | None = None) -> TrainingRun:
        """Continue the planned stages from ``step`` (after an interrupt or a reload)."""
        return _run(self, quiet=quiet, callback=callback)

    def save(self, directory: str | Path, *, overwrite: bool = False) -> Path:
        """Write the model checkpoint, task, training config, history and optimizer state to ``directory``.

        The save is atomic and carries a manifest of checksums (``ih_circuits.checkpoint``): a process killed
        while saving leaves the previous save or this one, never a mix. A directory that already holds
        something is refused unless ``overwrite=True``; overwriting replaces the whole directory, so no file
        of the previous save is left behind.
        """
        if white_box(self.model) is None and model_class(self.model) is None:
            raise ValueError(
                "TrainingRun.save supports IHTransformer runs and ordinary_transformer models (attention-only "
                f"TransformerLens models); this model is a {type(self.model).__name__}: save it with its own tools"
            )
        expected = history_columns(self.model)
        if len(self.history) and list(self.history.columns) != expected:
            raise ValueError(f"history columns {list(self.history.columns)} are not this model's: {expected}")
        with atomic_directory(directory, RUN_KIND, overwrite=overwrite) as staging:
            if white_box(self.model) is not None:
                self.model.save_pretrained(staging / "model")
            else:
                save_ordinary_transformer(self.model, staging / "model")
            meta = {
                "task": self.task.to_dict(),
                "train_config": self.config.to_dict(),
                "step": self.step,
                "interrupted": self.interrupted,
                "predicted_lags": None if self.predicted_lags is None else list(self.predicted_lags),
            }
            (staging / "run.json").write_text(json.dumps(meta, indent=2))
            if len(self.history):
                self.history.to_csv(staging / "history.csv", index=False)
            if self.optimizer_state is not None:
                torch.save(self.optimizer_state, staging / "optimizer.pt")
        return Path(directory)

    @classmethod
    def load(cls, directory: str | Path) -> TrainingRun:
        """Inverse of ``save``, after checking the manifest: a damaged, incomplete or mixed save is an error.

        Every file is validated before the run is built: all fields present and typed, ``step`` within the
        planned steps, the model's vocabulary and context equal to the task's, the history's columns those of
        this model, the optimizer state one of the stages'. Each failure is a ``ValueError`` naming the file
        and the field.
        """
        directory, manifest = open_save(directory, RUN_KIND)
        listed = manifest["files"]
        if "run.json" not in listed:
            raise ValueError(f"{directory} is not a saved TrainingRun: run.json is missing")
        meta_path = directory / "run.json"
        meta = read_json(meta_path)
        try:
            check_fields(meta, {"task", "train_config", "step", "interrupted", "predicted_lags"}, "run.json")
            task = _field(meta, "task", NGramTask.from_dict)
            config = _field(meta, "train_config", TrainConfig.from_dict)
            step = meta["step"]
            check_int(step, "step", 0, config.total_steps, high_text=f"{config.total_steps} (the planned steps)")
            if not isinstance(meta["interrupted"], bool):
                raise ValueError(f"interrupted must be true or false; got {meta['interrupted']!r}")
            predicted = meta["predicted_lags"]
            if predicted is not None:
                if not isinstance(predicted, list):
                    raise ValueError(f"predicted_lags must be a list of lags or null; got {predicted!r}")
                predicted = _field(meta, "predicted_lags", lambda lags: validate_lags(lags, "lags"))
        except ValueError as error:
            raise ValueError(f"{meta_path}: {error}") from None
        if f"model/{RECIPE_FILE}" in listed:
            model, config_file = load_ordinary_transformer(directory / "model"), RECIPE_FILE
            d_vocab, n_ctx = model.cfg.d_vocab, model.cfg.n_ctx
        else:
            model, config_file = IHTransformer.from_pretrained(directory / "model"), "config.json"
            d_vocab, n_ctx = model.config.d_vocab, model.config.n_ctx
        if d_vocab != task.vocab_size or n_ctx < task.seq_len:
            raise ValueError(
                f"{directory}: the model (model/{config_file} d_vocab={d_vocab}, n_ctx={n_ctx}) does not fit "
                f"the task (run.json vocab_size={task.vocab_size}, seq_len={task.seq_len})"
            )
        history = read_history(directory / "history.csv", model) if "history.csv" in listed else pd.DataFrame()
        if len(history) and int(history["step"].iloc[-1]) > step:
            raise ValueError(f"{directory / 'history.csv'}: records step {history['step'].iloc[-1]} after step {step}")
        optimizer_state = None
        if "optimizer.pt" in listed:
            optimizer_state = _read_optimizer_state(directory / "optimizer.pt", len(config.stages))
            _check_optimizer_state(directory / "optimizer.pt", optimizer_state, model, config)
        return cls(
            model=model,
            task=task,
            config=config,
            history=history,
            step=step,
            interrupted=meta["interrupted"],
            predicted_lags=predicted,
            optimizer_state=optimizer_state,
        )


def _field(data: dict[str, Any], name: str, parse: Callable[[Any], Any]) -> Any:
    """``parse(data[name])`` with the field's name added to any error."""
    try:
        return parse(data[name])
    except (ValueError, TypeError) as error:
        raise ValueError(f"{name}: {error}") from None


def _read_optimizer_state(path: Path, n_stages: int) -> dict[str, Any]:
    try:
        state = torch.load(path, weights_only=True)
    except Exception as error:  # torch.load raises several error types for a malformed file
        raise ValueError(f"{path} is not a readable optimizer state: {error}") from None
    stage = state.get("stage") if isinstance(state, dict) else None
    check_int(stage, f"{path}: stage", 0, n_stages - 1)
    if not isinstance(state.get("state"), dict):
        raise ValueError(f"{path}: state must be an optimizer state_dict")
    return state


def _check_optimizer_state(path: Path, state: dict[str, Any], model: nn.Module, config: TrainConfig) -> None:
    """Raise ``ValueError`` unless ``state`` loads into its stage's optimizer with every per-parameter tensor
    (Adam's moments) shaped like its parameter: torch's ``load_state_dict`` checks only the counts, and a
    wrong-sized moment would fail at the first resumed step, or broadcast silently."""
    index = state["stage"]
    params = parameter_groups(model, config.stages[index].groups)
    optimizer = _make_optimizer(config.stages[index], params)
    try:
        optimizer.load_state_dict(state["state"])
    except (ValueError, KeyError, TypeError, IndexError) as error:
        raise ValueError(f"{path}: the optimizer state does not fit stage {index}'s parameters: {error}") from None
    for number, param in enumerate(params):
        for name, value in optimizer.state.get(param, {}).items():
            if isinstance(value, Tensor) and value.dim() and value.shape != param.shape:
                raise ValueError(
                    f"{path}: the optimizer's {name} for parameter {number} of stage {index} has shape "
                    f"{tuple(value.shape)}, but the parameter has shape {tuple(param.shape)}"
                )


class _Evaluator:
    """The fixed evaluation batch, its Bayes loss, and the trajectory row of a model at a step."""

    def __init__(self, run: TrainingRun) -> None:
        cfg = run.config
        self.run = run
        batch = run.task.sample(cfg.eval_size, seed=derive_seed(cfg.seed, "eval"), device=cfg.device)
        self.tokens = batch.tokens
        bayes = run.task.bayes_predictive(self.tokens)
        nll = last_position_nll(bayes, self.tokens) if cfg.objective == "last" else next_token_nll(bayes, self.tokens)
        self.bayes_loss = float(nll.mean())

    @torch.no_grad()
    def row(self, step: int, stage: str, train_loss: float) -> dict[str, Any]:
        run, model = self.run, self.run.model
        eval_loss = chunked_loss(model, self.tokens, run.config.objective)
        row: dict[str, Any] = {
            "step": step,
            "stage": stage,
            "loss": train_loss,
            "eval_loss": eval_loss,
            "bayes_loss": self.bayes_loss,
            "excess_loss": eval_loss - self.bayes_loss,
        }
        ours = white_box(model)
        if ours is not None:
            shares = ours.selector_shares()
            leading = max(shares, key=shares.get)
            head_lags = ours.head_lags()
            row["a"] = ours.classifier_scale()
            row["leading_subset"] = str(leading)
            row["leading_lags"] = str(tuple(sorted(head_lags[h] for h in leading)))
            row["predicted_lags"] = str(run.predicted_lags)
            row.update({subset_column(s): v for s, v in shares.items()})
            weights = ours.copier_weights().cpu()
            for h in range(weights.shape[0]):
                row.update({weight_column(h, m): float(weights[h, m]) for m in range(weights.shape[1])})
        return row


def _batches(run: TrainingRun) -> Callable[[int], Tensor]:
    """Tokens for a global step: fresh (seeded by step) or the fixed set's next minibatch."""
    cfg, task = run.config, run.task
    if cfg.data == "fresh":
        return lambda step: (
            task.sample(cfg.batch_size, seed=derive_seed(cfg.seed, "data", step), device=cfg.device).tokens
        )
    dataset = task.fixed_dataset(cfg.dataset_size, seed=derive_seed(cfg.seed, "dataset"), device=cfg.device)
    per_epoch = math.ceil(cfg.dataset_size / cfg.batch_size)

    def fixed(step: int) -> Tensor:
        epoch, index = divmod(step, per_epoch)
        order = torch.randperm(
            cfg.dataset_size, generator=torch.Generator().manual_seed(derive_seed(cfg.seed, "epoch", epoch))
        )
        chosen = order[index * cfg.batch_size : (index + 1) * cfg.batch_size].to(dataset.tokens.device)
        return dataset.tokens[chosen]

    return fixed


class TrainingDiverged(FloatingPointError):
    """Training met a non-finite loss or gradient. ``run`` is the run up to the last finite step (parameters,
    history and optimizer state untouched by the bad step), so it can be inspected, saved or resumed."""

    def __init__(self, message: str, run: TrainingRun) -> None:
        super().__init__(message)
        self.run = run


def _check_finite(model: nn.Module, loss: Tensor, run: TrainingRun) -> None:
    """Raise ``TrainingDiverged`` naming the step and the parameters if the loss or a gradient is not finite."""
    keep = f"the run up to step {run.step} is kept in error.run (e.g. error.run.save(dir))"
    if not torch.isfinite(loss):
        raise TrainingDiverged(f"training loss became {loss.item()} at step {run.step}; {keep}", run)
    grads = [(name, p.grad) for name, p in model.named_parameters() if p.grad is not None]
    if grads and not torch.stack([g.isfinite().all() for _, g in grads]).all():
        bad = [name for name, g in grads if not g.isfinite().all()]
        raise TrainingDiverged(f"non-finite gradient of {bad} at step {run.step}; {keep}", run)


def _make_optimizer(stage: Stage, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if stage.optimizer == "adam":
        return torch.optim.Adam(params, lr=stage.lr)
    return torch.optim.SGD(params, lr=stage.lr)


def _stage_at(config: TrainConfig, step: int) -> tuple[int, Stage, int]:
    """(stage index, stage, first global step of that stage) for a global step."""
    start = 0
    for index, stage in enumerate(config.stages):
        if step < start + stage.steps:
            return index, stage, start
        start += stage.steps
    return len(config.stages) - 1, config.stages[-1], start - config.stages[-1].steps


def _run(run: TrainingRun, *, quiet: bool, callback: Callable[[TrainingRun], None] | None) -> TrainingRun:
    from tqdm.auto import tqdm

    cfg, model = run.config, run.model
    if next(model.parameters()).device != torch.device(cfg.device):
        model.to(cfg.device)
    was_training, frozen = model.training, [p for p in model.parameters() if not p.requires_grad]
    model.train()
    evaluator = _Evaluator(run)
    batch_at = _batches(run)
    rows = run.history.to_dict("records") if len(run.history) else []
    progress = tqdm(total=cfg.total_steps, initial=run.step, disable=quiet, desc="train", dynamic_ncols=True)
    run.interrupted = False
    try:
        if not rows:
            rows.append(evaluator.row(0, cfg.stages[0].name or "stage 0", float("nan")))
        with _interrupt_between_steps() as stop_requested:
            _steps(run, evaluator, batch_at, rows, progress, callback, stop_requested)
    except KeyboardInterrupt:
        run.interrupted = True
    finally:
        progress.close()
        still_frozen = {id(p) for p in frozen}
        for p in model.parameters():
            p.requires_grad_(id(p) not in still_frozen)
        model.train(was_training)
        run.history = pd.DataFrame(rows)
    return run


def _steps(
    run: TrainingRun,
    evaluator: _Evaluator,
    batch_at: Callable[[int], Tensor],
    rows: list[dict[str, Any]],
    progress: Any,
    callback: Callable[[TrainingRun], None] | None,
    stop_requested: Callable[[], bool],
) -> None:
    """The optimizer steps from ``run.step`` to the end; a requested stop raises KeyboardInterrupt between steps."""
    cfg, model = run.config, run.model
    optimizer, optimizer_stage = None, None
    while run.step < cfg.total_steps:
        index, stage, _ = _stage_at(cfg, run.step)
        if optimizer_stage != index:
            params = parameter_groups(model, stage.groups)
            moving = {id(p) for p in params}
            for p in model.parameters():
                p.requires_grad_(id(p) in moving)
            optimizer, optimizer_stage = _make_optimizer(stage, params), index
            if run.optimizer_state is not None and run.optimizer_state.get("stage") == index:
                optimizer.load_state_dict(run.optimizer_state["state"])
        tokens = batch_at(run.step)
        optimizer.zero_grad(set_to_none=True)
        loss = objective_loss(model, tokens, cfg.objective, cfg.loss)
        if torch.isfinite(loss):
            loss.backward()
        _check_finite(model, loss, run)
        optimizer.step()
        run.step += 1
        run.optimizer_state = {"stage": index, "state": optimizer.state_dict()}
        if run.step % cfg.record_every == 0 or run.step == cfg.total_steps:
            rows.append(evaluator.row(run.step, stage.name or f"stage {index}", float(loss.detach())))
            latest = rows[-1]
            progress.set_postfix(
                loss=f"{latest['eval_loss']:.4f}",
                excess=f"{latest['excess_loss']:.4f}",
                **({"lead": latest["leading_lags"], "a": f"{latest['a']:.2f}"} if "a" in latest else {}),
            )
        progress.update(1)
        if callback is not None:
            callback(run)
        if stop_requested():
            raise KeyboardInterrupt


@contextmanager
def _interrupt_between_steps() -> Iterator[Callable[[], bool]]:
    """Hold a Ctrl-C (SIGINT) until the current step is complete, so that a stopped run never holds half a
    step (weights updated, step not counted) and resumes exactly; a second Ctrl-C interrupts at once. Outside
    the main thread, where Python cannot handle signals, a Ctrl-C interrupts wherever it lands."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    requested: list[int] = []

    def hold(signum: int, frame: Any) -> None:
        if requested:
            raise KeyboardInterrupt
        requested.append(signum)

    previous = signal.signal(signal.SIGINT, hold)
    try:
        yield lambda: bool(requested)
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)


def train(
    model: nn.Module,
    task: NGramTask,
    config: TrainConfig,
    *,
    quiet: bool = False,
    callback: Callable[[TrainingRun], None] | None = None,
) -> TrainingRun:
    """Train ``model`` on ``task`` as ``config`` says and return the run with its recorded trajectory.

    Works for ``IHTransformer`` (any parameter groups) and for any module mapping tokens to next-token
    logits ``[batch, pos, d_vocab]``, such as the ordinary TransformerLens baseline (groups ``("all",)``).
    Ctrl-C stops training after the current step and returns what was recorded (``run.interrupted``);
    ``run.resume()`` goes on exactly as an uninterrupted run would.
    ``callback(run)`` is called after every step.
    """
    if not isinstance(task, NGramTask):
        raise ValueError(f"task must be an NGramTask; got {type(task).__name__}")
    if not isinstance(config, TrainConfig):
        raise ValueError(f"config must be a TrainConfig; got {type(config).__name__}")
    predicted = None
    ours = white_box(model)
    if ours is not None:
        cfg = ours.config
        if cfg.d_vocab != task.vocab_size:
            raise ValueError(f"model d_vocab={cfg.d_vocab} but task vocab_size={task.vocab_size}")
        if task.seq_len > cfg.n_ctx:
            raise ValueError(f"task seq_len={task.seq_len} exceeds the model's n_ctx={cfg.n_ctx}")
        predicted = task_prediction(task, cfg.max_degree, cfg.max_lag, quiet=quiet).best
    for stage in config.stages:
        parameter_groups(model, stage.groups)
    run = TrainingRun(model=model, task=task, config=config, predicted_lags=predicted)
    return _run(run, quiet=quiet, callback=callback)
