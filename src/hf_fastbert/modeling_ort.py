"""FastBERT on ONNX Runtime: the stages written by [`hf_fastbert.onnx_export.export_onnx`], run with batched per-sample
early exit between them, or nested in one session for a sample alone.

[`ORTFastBertForSequenceClassification`] loads like Optimum's `ORTModelForSequenceClassification` (a model folder with
an `onnx/` sub-folder), takes the arguments of [`FastBertForSequenceClassification`] (`speed`, `exit_rule`,
`output_all_logits`) and returns the same [`FastBertSequenceClassifierOutput`]: logits, 1-based exit layers and the
exact FLOPs of every sample. The text-classification pipeline takes it with `speed`.

The engine is the PyTorch one, on the runtime: after each layer's session run (the layer and its student), the samples
whose exit rule fires leave the batch; the remaining rows (and the padding columns no remaining sample needs) go to
the next layer's session. Exit decisions are those of `hf_fastbert.exit_rules` on the stage's outputs: the entropy rule
reads the uncertainty each layer graph computes (one comparison per sample), the others the student's logits. A sample
alone (batch 1, and every sample of an int8 export) under the entropy rule on the graphs' own uncertainty, without
`output_all_logits`, runs one session instead: the layer graphs nested in `If`s, built at load
([`hf_fastbert.onnx_export.early_exit_graph`]), which decides each exit in the graph, in float32 as the batched loop
does. Speed 0 runs the whole model in one session run (`onnx/model.onnx`), without the students.

Example:

```python
>>> from hf_fastbert.modeling_ort import ORTFastBertForSequenceClassification

>>> model = ORTFastBertForSequenceClassification.from_pretrained("out/fastbert-rt", threads=1)  # after `export`
>>> output = model(**tokenizer(["A gem.", "Too long."], padding=True, return_tensors="np"), speed=0.3)
>>> output.logits, output.exit_layers, output.flops
```
"""

import json
import logging
import tempfile
from pathlib import Path

import numpy as np
import torch

from .configuration_fastbert import validate_speed
from .exit_rules import check_exit_rule, exits_at_layer, select_exits
from .files import atomic_path
from .modeling_fastbert import FastBertModelMixin, FastBertSequenceClassifierOutput, sample_columns
from .onnx_export import (
    EARLY_EXIT,
    FORMAT_VERSION,
    FULL_MODEL,
    MANIFEST,
    ONNX_EXTRA_HINT,
    ONNX_FOLDER,
    config_signature,
    early_exit_graph,
    stage_names,
    weights_fingerprint,
)


logger = logging.getLogger(__name__)

_CPU = torch.device("cpu")


def _import_onnxruntime():
    try:
        import onnx  # noqa: F401 (`early_exit_graph` reads the layer graphs with it)
        import onnxruntime
    except ImportError:
        raise ImportError(f"The ONNX Runtime backend needs the [onnx] extra: {ONNX_EXTRA_HINT}") from None
    return onnxruntime


def _as_numpy(value, dtype=np.int64):
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        value = value.numpy(force=True)  # one call: detached, on the CPU (shares memory when it can)
    return np.ascontiguousarray(value, dtype=dtype)


def _early_exit_session(ort, folder, stages, session_options, provider):
    """
    The session a sample alone runs: the layer graphs of `folder` nested in one (`early_exit_graph`), built at load so
    that the folder keeps one copy of the layers. Its weights reach ONNX Runtime through a temporary external-data
    file (in `tempfile`'s folder, `TMPDIR`), which ONNX Runtime maps: given inline, a subgraph's initializers are held
    over again (on the demo model the session grew by 4.8x-6.5x the layer files' size, against 1.3x-1.8x from a file:
    `benchmarks/results/onnx_memory.md`; ONNX Runtime's own beam-search tools move them out of subgraphs for the same
    reason, which would cost each `If` every later layer's weights as inputs).
    """
    import onnx

    layers = [onnx.load(str(folder / ONNX_FOLDER / name)) for name in stages]
    with tempfile.TemporaryDirectory(prefix="hf-fastbert-", ignore_cleanup_errors=True) as work:
        path = Path(work) / "early_exit.onnx"
        graph = early_exit_graph(layers)
        del layers
        onnx.save_model(graph, path, save_as_external_data=True, location="early_exit.data", size_threshold=1024)
        del graph
        return ort.InferenceSession(str(path), session_options, providers=[provider])


def check_onnx_folder(folder, config) -> dict:
    """
    Read `<folder>/onnx/fastbert_onnx.json` and check that the `onnx/` folder belongs to this model: same format, same
    config fields the graphs depend on, same weights (when the folder holds `model.safetensors`), every stage present.

    Returns:
        The manifest.

    Raises:
        `FileNotFoundError` without an exported `onnx/` folder; `ValueError` naming the mismatch.
    """
    folder = Path(folder)
    onnx_dir = folder / ONNX_FOLDER
    manifest_path = onnx_dir / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(
            f"{folder} has no exported ONNX stages ({ONNX_FOLDER}/{MANIFEST} is missing): run "
            f"`hf-fastbert export {folder}` (or hf_fastbert.onnx_export.export_onnx) first."
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{manifest_path} is not a valid manifest ({error}): export the model again.") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{onnx_dir} was written by another hf-fastbert ONNX format ({manifest.get('format_version')!r}, this "
            f"version reads {FORMAT_VERSION}): export the model again."
        )
    expected = config_signature(config)
    for key, value in expected.items():
        if manifest.get("config", {}).get(key) != value:
            raise ValueError(
                f"{onnx_dir} does not match the model's config.json: {key} is {manifest.get('config', {}).get(key)!r} "
                f"in the ONNX export and {value!r} in the config. It belongs to another model, or the config changed "
                f"since the export: run `hf-fastbert export {folder}` again."
            )
    exported_from = manifest.get("model_safetensors_sha256")
    if exported_from is not None:
        current = weights_fingerprint(folder)
        if current is not None and current != exported_from:
            raise ValueError(
                f"{onnx_dir} was exported from other weights than {folder}/model.safetensors: run "
                f"`hf-fastbert export {folder}` again."
            )
    stages = stage_names(config.num_hidden_layers)
    if manifest.get("stages") != stages:
        raise ValueError(f"{onnx_dir}: the manifest lists {manifest.get('stages')}, expected {stages}.")
    full_model = manifest.get("full_model")
    if full_model != FULL_MODEL:
        raise ValueError(f"{onnx_dir}: the manifest names the full model {full_model!r}, expected {FULL_MODEL!r}.")
    missing = [name for name in stages + [FULL_MODEL] if not (onnx_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{onnx_dir} lacks {', '.join(missing)}: export the model again.")
    return manifest


class ORTFastBertForSequenceClassification:
    """
    A FastBERT classifier on ONNX Runtime (CPU), with the PyTorch model's call signature and outputs.

    Attributes:
        config: the model's FastBERT config (`speed`, `exit_rule`, labels), from its `config.json`.
        manifest (`dict`): what the `onnx/` folder was exported from (`int8`, fusions per stage, versions).
        int8_per_sample (`bool`): whether a batch runs one sample at a time, each without its padding (True for
            int8 exports, whose activations are quantized per run: a sample's answer is then the same in any batch;
            set it to False to run int8 batches together, faster at large batches but batch-dependent).
        sessions (`dict[str, onnxruntime.InferenceSession]`): one per file of the `onnx/` folder, by file name
            (`layer_<i>.onnx` with its student, the first from the token ids, and `model.onnx`, the whole model,
            which speed 0 runs in one session run), and `early_exit`: the layer graphs nested in one, which a sample
            alone runs to its exit (built at load, not written to the folder; it holds one more copy of the layers'
            weights in memory).
    """

    main_input_name = "input_ids"
    training = False

    def __init__(self, config, sessions, manifest, name_or_path=None):
        self.config = config
        self.sessions = sessions
        self.manifest = manifest
        self.name_or_path = name_or_path
        self._token_types = manifest["token_type_ids"]
        # int8 stages quantize activations per run: each sample runs alone, so its answer is the same in any batch.
        self.int8_per_sample = bool(manifest.get("int8"))
        self._num_layers = config.num_hidden_layers  # fixed by the graphs (checked at load)
        self._layers = [sessions[f"layer_{index}.onnx"] for index in range(self._num_layers)]
        self._full_model = sessions[FULL_MODEL]  # speed 0: one run of the whole model
        self._early_exit = sessions.get(EARLY_EXIT)  # a sample alone: one run to its exit (None: not built)
        for key, value in (manifest.get("calibration") or {}).items():
            setattr(self.config, key, value)  # chosen on these stages' own outputs (`save_calibration`)

    # The PyTorch model's own: they read only `self.config` (and keep the FLOPs tables in `self.__dict__`).
    calibrate_exit_rules = FastBertModelMixin.calibrate_exit_rules
    exit_flops = FastBertModelMixin.exit_flops
    _flops_table = FastBertModelMixin._flops_table

    def save_calibration(self, folder=None) -> Path:
        """
        Keep the config's exit rule, speed and calibrated rules as this export's defaults: they are written into
        `onnx/fastbert_onnx.json` (atomically), not into `config.json`, whose defaults stay the PyTorch model's (int8
        on the runtime shifts the students' confidence, so each backend has its own). Returns the manifest's path.
        """
        folder = Path(folder or self.name_or_path)
        path = folder / ONNX_FOLDER / MANIFEST
        fields = ("exit_rule", "speed", "exit_thresholds", "exit_heads", "uncertainty_top_k")
        self.manifest["calibration"] = {name: getattr(self.config, name, None) for name in fields}
        with atomic_path(path) as temporary:
            temporary.write_text(json.dumps(self.manifest, indent=2) + "\n")
        return path

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path,
        *,
        threads: int | None = None,
        session_options=None,
        provider: str = "CPUExecutionProvider",
        nested_session: bool = True,
        config=None,
        **kwargs,
    ):
        """
        Load the ONNX stages of a model folder (or a Hub repo with an `onnx/` folder).

        Args:
            pretrained_model_name_or_path (`str`): the model folder or Hub repo id.
            threads (`int`, *optional*): intra-op threads of every session (ONNX Runtime's default: one per core).
                Each session has its own pool, whose workers spin between the operators of a run and stop spinning
                when it returns (`session.force_spinning_stop`): the stages run one after another, and workers left
                spinning by the sessions that just ran took the cores from the next one (5-7x slower than the stock
                graph), while workers put to sleep between operators are woken for each one (16-21% slower at speed
                0, batch 1, 2 threads: `benchmarks/results/onnx_threads.md`).
            session_options (`onnxruntime.SessionOptions`, *optional*): used as given (then `threads` must be None).
                For one thread pool shared by every session (for batches, whose rows run one session per layer; a
                sample alone runs one session, and in that benchmark int8 early exit ran 1.87x the stock graph's
                speed with it, 1.85x without): call `onnxruntime.set_global_thread_pool_sizes(threads)` before the
                process creates any session, and pass options with `use_per_session_threads = False` (every session
                of the process must then have them).
            provider (`str`, *optional*, defaults to `"CPUExecutionProvider"`).
            nested_session (`bool`, *optional*, defaults to `True`): build the session a sample alone runs (batch 1,
                and every sample of an int8 export), the layer graphs nested in `If`s: one session run per sample
                instead of one per layer reached. It holds one more copy of the layers' weights, mapped from a
                temporary file written at load (`TMPDIR`; without a usable one, a warning, and the layer sessions
                serve). False: no such session, no file, the same answers.
            config (*optional*): the FastBERT config, when not read from the folder.
            kwargs: passed to `huggingface_hub.snapshot_download` for a Hub repo (`revision`, `token`, ...).
        """
        ort = _import_onnxruntime()
        from transformers import AutoConfig

        from .configuration_fastbert import is_fastbert_model_type

        folder = Path(pretrained_model_name_or_path)
        if not folder.is_dir():
            from huggingface_hub import snapshot_download

            folder = Path(
                snapshot_download(
                    str(pretrained_model_name_or_path),
                    allow_patterns=["*.json", "*.txt", "*.model", f"{ONNX_FOLDER}/*", "model.safetensors"],
                    **kwargs,
                )
            )
        if config is None:
            config = AutoConfig.from_pretrained(folder)
        if not is_fastbert_model_type(getattr(config, "model_type", None)):
            raise ValueError(
                f"{pretrained_model_name_or_path} is not a FastBERT model (model_type={config.model_type!r})."
            )
        manifest = check_onnx_folder(folder, config)
        if session_options is not None and threads is not None:
            raise ValueError(
                "Give `threads` or `session_options`, not both (set intra_op_num_threads on the options)."
            )
        if session_options is None:
            session_options = ort.SessionOptions()
            if threads is not None:
                if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
                    raise ValueError(f"`threads` must be an integer >= 1, got {threads!r}.")
                session_options.intra_op_num_threads = threads
            session_options.add_session_config_entry("session.intra_op.allow_spinning", "1")  # see `threads`
            session_options.add_session_config_entry("session.force_spinning_stop", "1")
        sessions = {}
        for name in manifest["stages"] + [FULL_MODEL]:
            path = folder / ONNX_FOLDER / name
            try:
                sessions[name] = ort.InferenceSession(str(path), session_options, providers=[provider])
            except Exception as error:  # ONNX Runtime's errors for a corrupted or foreign file
                raise ValueError(f"{path} is not a valid ONNX model ({error}): export the model again.") from None
        if nested_session:
            try:
                sessions[EARLY_EXIT] = _early_exit_session(ort, folder, manifest["stages"], session_options, provider)
            except OSError as error:  # no usable temporary folder: a sample alone runs the layer sessions
                logger.warning(
                    "The layer graphs were not nested in one session (%s): a sample alone runs one session per layer. "
                    "Set TMPDIR to a writable folder, or pass nested_session=False to silence this.",
                    error,
                )
            except Exception as error:  # ONNX Runtime's own
                raise ValueError(
                    f"The layer graphs of {folder / ONNX_FOLDER} could not be nested in one session ({error}): export "
                    "the model again, or load it with nested_session=False."
                ) from None
        return cls(config, sessions, manifest, name_or_path=str(pretrained_model_name_or_path))

    # What the pipeline and the `Trainer`-free evaluation code read of a model.
    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def num_labels(self) -> int:
        return self.config.num_labels

    def to(self, device):
        if torch.device(device).type != "cpu":
            raise ValueError(f"The ONNX Runtime model runs on the CPU; it cannot move to {device}.")
        return self

    def eval(self):
        return self

    def can_generate(self) -> bool:
        return False

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        speed: float | None = None,
        output_all_logits: bool = False,
        exit_rule: str | None = None,
        **kwargs,
    ) -> FastBertSequenceClassifierOutput:
        """
        Same arguments and outputs as [`FastBertForSequenceClassification.forward`] (no labels, no `inputs_embeds`):
        `input_ids`, `attention_mask`, `token_type_ids` as torch tensors or numpy arrays.
        """
        unexpected = {name for name, value in kwargs.items() if value is not None} - {"return_dict"}
        if unexpected:
            raise ValueError(f"The ONNX Runtime model takes no {', '.join(sorted(unexpected))}.")
        if input_ids is None:
            raise ValueError("input_ids is required.")
        speed = validate_speed(self.config.speed if speed is None else speed)
        exit_rule = check_exit_rule(self.config, exit_rule)
        ids = _as_numpy(input_ids)
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {ids.shape}.")
        mask = np.ones_like(ids) if attention_mask is None else _as_numpy(attention_mask)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask has shape {mask.shape}, input_ids {ids.shape}.")
        batch_size, seq_length = ids.shape
        feed = {"input_ids": ids, "attention_mask": mask}
        if self._token_types:
            feed["token_type_ids"] = np.zeros_like(ids) if token_type_ids is None else _as_numpy(token_type_ids)
        if self.int8_per_sample and batch_size > 1:
            # int8 stages quantize activations per session run: each sample runs alone, without its padding, so that
            # its answer does not depend on the other samples of the batch.
            parts = []
            for row in range(batch_size):
                keep = sample_columns(mask[row])
                sample = {name: np.ascontiguousarray(value[row : row + 1, keep]) for name, value in feed.items()}
                parts.append(self._run(sample, speed, output_all_logits, exit_rule))
            logits, exit_layers, all_logits = (
                None if parts[0][index] is None else np.concatenate([part[index] for part in parts])
                for index in range(3)
            )
        else:
            logits, exit_layers, all_logits = self._run(feed, speed, output_all_logits, exit_rule)
        if all_logits is not None:  # every layer ran on every sample: the exits are selected here
            all_logits = torch.from_numpy(all_logits)
            logits, exit_layers = select_exits(all_logits, speed, self.config, exit_rule)
            exit_layers = exit_layers.numpy()
        # As the PyTorch model counts them: with the students at speed > 0, without at speed 0.
        table = self._flops_table(_CPU, speed > 0, seq_length).numpy()  # (size, L), kept
        flops = table[mask.sum(axis=1), exit_layers - 1]  # (B,)
        return FastBertSequenceClassifierOutput(
            logits=torch.as_tensor(logits),
            exit_layers=torch.from_numpy(exit_layers),
            flops=torch.from_numpy(flops),
            all_logits=all_logits,
        )

    def _run(self, feed, speed, output_all_logits, exit_rule):
        """
        One batch through the sessions, numpy in and out: `(logits (B, C), exit_layers (B,), all_logits (B, L, C) or
        None)`; with `output_all_logits` every layer runs on every sample, and the caller selects the exits.
        """
        mask = feed["attention_mask"]
        batch_size, seq_length = mask.shape
        num_layers = self._num_layers
        if speed == 0 and not output_all_logits:  # no sample can leave: the stock computation, one session run
            return self._full_model.run(None, feed)[0], np.full(batch_size, num_layers, dtype=np.int64), None
        # The layer graphs' `uncertainty` is the entropy rule's measure unless the config asks for another top-k.
        graph_uncertainty = exit_rule == "entropy" and (
            self.config.uncertainty_top_k == self.manifest.get("uncertainty_top_k")
        )
        if batch_size == 1 and graph_uncertainty and not output_all_logits and self._early_exit is not None:
            # Compared in float32 in the graph, as below.
            logits, exit_layer = self._early_exit.run(None, {**feed, "speed": np.array(speed, dtype=np.float32)})
            return logits, exit_layer, None
        logits = np.empty((batch_size, self.config.num_labels), dtype=np.float32)  # (B, C)
        exit_layers = np.full(batch_size, num_layers, dtype=np.int64)  # (B,)
        rows = np.arange(batch_size)  # caller's index of each remaining sample
        last_columns = ((mask != 0) * np.arange(1, seq_length + 1)).max(axis=1)  # (B,) last column each one needs
        student_logits, rule_state = [], None
        # Layer 0 reads the caller's token ids (the embeddings are in its graph), the others the hidden states.
        for index in range(num_layers):
            if index == num_layers - 1:
                teacher_logits = self._layers[index].run(None, feed)[0]  # (b, C)
                logits[rows] = teacher_logits
                break
            hidden, branch_logits, uncertainty = self._layers[index].run(None, feed)  # (b, T', H), (b, C), (b,)
            if output_all_logits:
                student_logits.append(branch_logits)
            else:
                if graph_uncertainty:
                    exits = uncertainty < speed  # (b,)
                else:
                    exits, rule_state = exits_at_layer(
                        self.config, speed, index, torch.from_numpy(branch_logits), rule_state, exit_rule
                    )
                    exits = exits.numpy()
                num_exits = int(exits.sum())
                if num_exits:
                    leave = np.flatnonzero(exits)
                    logits[rows[leave]] = branch_logits[leave]
                    exit_layers[rows[leave]] = index + 1
                    if num_exits == len(exits):
                        break
                    stay = np.flatnonzero(~exits)
                    used_columns = int(last_columns[stay].max()) or mask.shape[1]  # all-zero masks: every column
                    rows, last_columns = rows[stay], last_columns[stay]
                    hidden = np.ascontiguousarray(hidden[stay, :used_columns])
                    mask = np.ascontiguousarray(mask[stay, :used_columns])
                    if rule_state is not None:
                        rule_state = tuple(value[torch.from_numpy(stay)] for value in rule_state)
            feed = {"hidden_states": hidden, "attention_mask": mask}
        if output_all_logits:
            return logits, exit_layers, np.stack(student_logits + [teacher_logits], axis=1)  # (B, L, C)
        return logits, exit_layers, None


__all__ = ["ORTFastBertForSequenceClassification", "check_onnx_folder"]
