"""Stage 7 (GLM-4-Voice decoder) — flow-matching speech decoder (seeds/003 §2.1 "speech decoder", App. B.2; CosyVoice).

    python -m lit_keomni fit --config recipes/stage7_flow.yaml

Learns speech tokens (a stage-1 export's 12.5 Hz codes, or the imported glm-4-voice-tokenizer's) -> 80-bin 22,050 Hz
log-mel of the same utterance (``nn.flow.FlowDecoder``: block-causal token encoder, length regulator, conditional
flow matching with a U-Net estimator; no speaker embedding, as in the paper). Loss: the flow-matching MSE of
``FlowDecoder.loss`` (random flow time, noise, prompt prefix and condition dropout per utterance, drawn from a
generator seeded by (seed, step, rank), so a resumed run draws what the uninterrupted one would). AdamW with warm-up
and cosine decay (paper: lr 1e-3); optionally the encoder loss of Grad-TTS (``prior_weight``). Validation: ``val/loss``
(fixed draws), ``val/prior``, ``val/mel_l1`` of mels sampled with
``val_n_timesteps`` ODE steps for ``val_samples`` utterances, mel images; with ``mel_vocoder`` their audio, and with
``asr_from`` ``val/resynth_cer`` of the resynthesised audio next to ``val/orig_cer`` of the original.
Inputs: ``units_from`` and ``datamodules.flow_decoder`` pairs. Output: ``checkpoints/stage7_flow/export`` (kind
"flow_decoder", read by ``checkpoints.load_flow_decoder`` and ``token2wav.load_token2wav``; the mel vocoder, when
given, copied into its ``mel_vocoder`` subfolder).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lit_keomni.checkpoints import CONFIG_FILE, read_export_meta, unit_meta, write_export
from lit_keomni.configs import config_dict
from lit_keomni.distributed import full_state_dict, shard_or_compile
from lit_keomni.nn.audio import mel_spectrogram_image
from lit_keomni.nn.flow import FlowConfig, FlowDecoder
from lit_keomni.token2wav import EXPORT_KIND, copy_vocoder, flow_export_meta, frame_noise
from lit_keomni.training import Stage, gather_lists

VAL_SEED = 0
"""Seed of validation's loss draws and of the sampled mels' noise: the same figures for the same weights."""


class FlowModel(nn.Module):
    """The ``FlowDecoder`` behind one ``forward(method, ...)``, so that a sharded model's root hooks run for its loss
    and its sampling alike."""

    def __init__(self, flow: FlowDecoder) -> None:
        super().__init__()
        self.flow = flow

    def forward(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.flow, method)(*args, **kwargs)


class SpeechFlowDecoder(Stage):
    """GLM-4-Voice's flow-matching decoder (tokens -> mel); exports the handoff folder ``Token2Wav`` speaks with."""

    adam_betas = (0.9, 0.999)  # CosyVoice trains with Adam's defaults

    def __init__(
        self,
        config: str = "tiny",
        overrides: dict[str, Any] | None = None,
        units_from: str = "checkpoints/stage1/export",
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
        decay: str = "cosine",
        prior_weight: float = 0.0,
        prior_steps: int = 0,
        val_samples: int = 4,
        val_n_timesteps: int = 10,
        val_cfg_rate: float | None = None,
        val_log_samples: int = 2,
        mel_vocoder: str | None = None,
        asr_from: str | None = None,
        export_dir: str | None = "checkpoints/stage7_flow/export",
        activation_checkpointing: bool = False,
        compile: bool = False,
    ) -> None:
        """
        Args:
            config: ``FlowConfig`` preset ("tiny" for CPU, "glm-4-voice-decoder" = the released sizes).
            overrides: Field overrides of the preset; ``vocab_size`` and ``frame_rate`` default to the codebook size
                and token rate of ``units_from`` (given, they must equal them).
            units_from: Stage-1 export whose speech tokens the decoder reads (its fingerprint goes into the export).
            lr: Peak learning rate (paper: 1e-3).
            weight_decay: AdamW weight decay (not on norms, biases and embeddings).
            warmup_steps: Linear warm-up steps (CosyVoice: 2,500).
            min_lr_ratio: The cosine decay ends at this fraction of ``lr``.
            decay: "cosine" or "linear" decay after warm-up.
            prior_weight: Weight of the encoder loss (``mu`` against the target mel, as Grad-TTS and Matcha-TTS train
                their encoders) added to the flow-matching loss. 0 = GLM-4-Voice / CosyVoice (the paper recipe); on
                a CPU budget it makes ``mu`` a coarse mel early, which the estimator then only refines.
            prior_steps: The first this many optimiser steps train the token encoder and length regulator alone on
                the encoder loss (``FlowDecoder.prior_loss``; the estimator is not run, so a step costs about a fifth
                of a flow step); then the flow loss (plus ``prior_weight`` times the encoder loss) trains everything.
                0 = the paper recipe.
            val_samples: Validation utterances (per rank) whose mel is sampled: ``val/mel_l1``, images, audio, CER.
            val_n_timesteps: ODE steps of those samples (the reference: 10).
            val_cfg_rate: Guidance weight of those samples; None = the config's ``inference_cfg_rate`` (0.7).
            val_log_samples: Of those, how many go to TensorBoard as mel images (and audio, with a vocoder).
            mel_vocoder: A "mel_vocoder" export (stage 7 HiFT, or an imported decoder's) turning sampled mels into
                audio; None = no audio. Copied into the export.
            asr_from: A stage-1 export (e.g. checkpoints/asr/export) that transcribes the resynthesised and the
                original audio in validation: ``val/resynth_cer``, ``val/orig_cer``. Needs ``mel_vocoder``.
            export_dir: Where the ``Export`` callback writes the handoff folder at the end of fit.
            activation_checkpointing: Recompute each block's activations in backward (sharded runs).
            compile: ``torch.compile`` the encoder layers and estimator levels.
        """
        super().__init__()
        self.save_hyperparameters()
        if config not in FlowConfig.presets:
            raise ValueError(f"model.config: unknown FlowConfig preset {config!r}; known: {sorted(FlowConfig.presets)}")
        if prior_steps < 0:
            raise ValueError(f"model.prior_steps: must be >= 0, got {prior_steps}")
        if asr_from and not mel_vocoder:
            raise ValueError("model.asr_from needs model.mel_vocoder: the resynthesis CER transcribes vocoded audio")
        self.flow_config: FlowConfig | None = None
        self.model: FlowModel | None = None
        self.units_meta: dict[str, Any] = {}
        # The loss's random draws and dropout come from seeds of (noise_seed, step, rank), not from torch's global
        # generator, whose draws (e.g. by each new loader iterator) differ between a run and its resumption.
        self.noise_seed = int(torch.initial_seed()) % 2**31
        self._vocoder: list[Any] = []  # not submodules: neither trained nor saved
        self._asr: list[Any] = []
        self._val: dict[str, list] = {}

    # ------------------------------------------------------------------ model
    def configure_model(self) -> None:
        if self.model is not None:
            return
        self.model = FlowModel(FlowDecoder(self._config()))
        est = self.model.flow.estimator
        shard_or_compile(self, self.model, [*self.model.flow.encoder.layers, *est.down, *est.mid, *est.up])

    def _config(self) -> FlowConfig:
        """The ``FlowConfig``: the preset, the overrides, and the vocabulary and token rate of ``units_from``."""
        if self.flow_config is not None:
            return self.flow_config
        h = self.hparams
        self.units_meta = unit_meta(h.units_from)
        where = Path(h.units_from) / CONFIG_FILE
        field = "codebook_size" if self.units_meta["kind"] == "speech_tokenizer" else "config.num_units"
        rate_field = "frame_rate_hz" if self.units_meta["kind"] == "speech_tokenizer" else "config.frame_rate"
        overrides = dict(h.overrides or {})
        for name, value, src in (("vocab_size", self.units_meta["num_units"], field),
                                 ("frame_rate", self.units_meta["frame_rate"], rate_field)):
            if name in overrides and float(overrides[name]) != float(value):
                raise ValueError(f"model.overrides.{name} is {overrides[name]}, but {where} field '{src}' is {value}: "
                                 f"the flow decoder reads exactly that tokenizer's tokens (leave it out to take it)")
            overrides[name] = value
        self.flow_config = FlowConfig.from_name(h.config, **overrides)
        return self.flow_config

    @property
    def flow(self) -> FlowDecoder:
        return self.model.flow

    @property
    def sample_rate(self) -> int:
        """Audio rate of the mel (``TokenThroughput`` reads it)."""
        return self.flow_config.sample_rate if self.flow_config else 22050

    def setup(self, stage: str) -> None:
        c = self._config()
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None and hasattr(dm, "units_from"):
            if unit_meta(dm.units_from)["fingerprint"] != self.units_meta["fingerprint"]:
                raise ValueError(f"data.units_from ({dm.units_from}) and model.units_from ({self.hparams.units_from}) "
                                 f"are different exports; the tokens must be those the decoder reads")
            for name, want in (("audio_rate", c.sample_rate), ("hop", c.hop_length), ("n_mels", c.n_mels)):
                if getattr(dm, name) != want:
                    raise ValueError(f"data.{name} is {getattr(dm, name)}, but the flow config ({self.hparams.config}) "
                                     f"has {want}")
        if self.hparams.mel_vocoder and not self._vocoder:
            from lit_keomni.checkpoints import load_mel_vocoder

            meta = read_export_meta(self.hparams.mel_vocoder, "mel_vocoder")
            ours = self._mel_settings()
            for name, want in (("sample_rate", c.sample_rate), ("n_mels", c.n_mels), ("hop", c.hop_length),
                               ("mel", ours)):
                if meta.get(name) != want:
                    raise ValueError(f"{Path(self.hparams.mel_vocoder) / CONFIG_FILE}: field '{name}' is "
                                     f"{meta.get(name)!r}, but this decoder writes {want!r} (model.mel_vocoder)")
            self._vocoder.append(load_mel_vocoder(self.hparams.mel_vocoder)[0])
        if self.hparams.asr_from and not self._asr:
            from lit_keomni.eval.asr import Transcriber

            self._asr.append(Transcriber(self.hparams.asr_from, "cpu", batch_size=8))

    def _mel_settings(self) -> dict[str, Any]:
        """The settings of the mel trained on: the datamodule's ``MelFrontEnd``, else the released decoder's at this
        config's rates (n_fft 1024, 0-8 kHz)."""
        from lit_keomni.nn.hift import MelFrontEnd

        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if hasattr(dm, "mel"):
            return dm.mel().settings()
        c = self.flow_config
        return MelFrontEnd(c.sample_rate, 1024, c.hop_length, c.n_mels, 8000.0).settings()

    # ------------------------------------------------------------------ steps
    def _seed(self) -> int:
        """The seed of this step's draws on this rank."""
        return (self.noise_seed * 1_000_003 + self.global_step * 7919 + self.global_rank) % 2**63

    def _loss(self, batch: dict[str, Any], seed: int, prior_only: bool = False) -> dict[str, Tensor]:
        """``FlowDecoder.loss`` of the batch with its draws from ``seed`` (or only its encoder loss, "prior")."""
        mel = batch["mel"].transpose(1, 2)  # (B, F, n_mels) -> (B, n_mels, F)
        args = (batch["codes"], batch["codes_lengths"], mel, batch["mel_lengths"])
        devices = [mel.device] if mel.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)  # dropout
            if prior_only:
                return {"prior": self.model("prior_loss", *args)}
            return self.model("loss", *args, generator=torch.Generator(device=mel.device).manual_seed(seed))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        b = batch["codes"].shape[0]
        if self.global_step < self.hparams.prior_steps:
            prior = self._loss(batch, self._seed(), prior_only=True)["prior"]
            self.log("train/prior", prior, batch_size=b)
            return prior
        out = self._loss(batch, self._seed())
        self.log("train/loss", out["loss"], prog_bar=True, batch_size=b)
        self.log("train/prior", out["prior"], batch_size=b)
        self.log("train/t", out["t"].mean(), batch_size=b)
        w = self.hparams.prior_weight
        return out["loss"] + w * out["prior"] if w else out["loss"]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["noise_seed"] = self.noise_seed

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.noise_seed = int(checkpoint.get("noise_seed", self.noise_seed))

    # ------------------------------------------------------------------ validation
    def on_validation_epoch_start(self) -> None:
        self._val = {"loss": [], "prior": [], "l1": [], "refs": [], "resynth": [], "orig": [], "langs": []}

    @torch.no_grad()
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        out = self._loss(batch, VAL_SEED + batch_idx)
        b = batch["codes"].shape[0]
        self._val["loss"].append((float(out["loss"]) * b, b))
        self._val["prior"].append(float(out["prior"]) * b)
        h = self.hparams
        for i in range(b):
            k = len(self._val["l1"])
            if k >= h.val_samples:
                break
            n, f = int(batch["codes_lengths"][i]), int(batch["mel_lengths"][i])
            target = batch["mel"][i, :f].T.float()
            noise = frame_noise(0, f, self.flow_config.n_mels, VAL_SEED, target.device).to(target)
            gen = self.model("inference", batch["codes"][i: i + 1, :n], n_timesteps=h.val_n_timesteps,
                             cfg_rate=h.val_cfg_rate, noise=noise)[0].float()
            self._val["l1"].append(float((gen - target).abs().mean()))
            wav = self._vocode(gen) if self._vocoder else None
            if k < h.val_log_samples:
                self._log_sample(batch["id"][i], target, gen, wav, batch["audio"][i, : f * self.flow_config.hop_length])
            if self._asr and wav is not None:
                self._val["refs"].append(batch["text"][i])
                self._val["langs"].append(batch["language"][i])
                self._val["resynth"].append(wav)
                self._val["orig"].append(batch["audio"][i, : f * self.flow_config.hop_length].float().cpu())

    def _vocode(self, mel: Tensor) -> Tensor:
        vocoder = self._vocoder[0].to(mel.device)
        g = torch.Generator(device=mel.device).manual_seed(VAL_SEED)
        return vocoder.inference(mel[None].float(), generator=g)[0][0].float().cpu()

    def on_validation_epoch_end(self) -> None:
        from lit_keomni.eval.asr import error_rate

        v = self._val
        sums = torch.tensor([sum(x for x, _ in v["loss"]), sum(n for _, n in v["loss"]), sum(v["l1"]), len(v["l1"]),
                             sum(v["prior"])], dtype=torch.float64)
        if self.trainer.world_size > 1:
            sums = self.all_gather(sums).sum(0)
        metrics = {"val/loss": float(sums[0] / max(float(sums[1]), 1.0)),
                   "val/prior": float(sums[4] / max(float(sums[1]), 1.0))}
        if float(sums[3]):
            metrics["val/mel_l1"] = float(sums[2] / sums[3])
        if self._asr:
            from lit_keomni.audio import SAMPLE_RATE, resample

            asr = self._asr[0]
            hyps = {key: asr([torch.from_numpy(resample(w.numpy(), self.flow_config.sample_rate, SAMPLE_RATE))
                              for w in v[key]])[0] if v[key] else [] for key in ("resynth", "orig")}
            lists = gather_lists({"refs": v["refs"], "langs": v["langs"], **hyps})
            if lists["refs"]:
                for key, name in (("resynth", "val/resynth_cer"), ("orig", "val/orig_cer")):
                    cer = error_rate(lists["refs"], lists[key], lists["langs"]).get("cer")
                    if cer is not None:
                        metrics[name] = cer
        for name, value in metrics.items():
            self.log(name, value, prog_bar=name in ("val/loss", "val/mel_l1"))
        if self.trainer.sanity_checking and self.logger is not None and self.global_rank == 0:
            # Lightning drops self.log() of the sanity check: keep the figures at the start directly
            self.logger.log_metrics({f"{k}_start": x for k, x in metrics.items()}, step=self.global_step)
        shown = ", ".join(f"{k} {x:.4f}" for k, x in metrics.items())
        self.print(f"step {self.global_step}{' (start)' if self.trainer.sanity_checking else ''}: {shown}")

    def _log_sample(self, uid: str, target: Tensor, gen: Tensor, wav: Tensor | None, real: Tensor) -> None:
        """Target and generated mel images (and audio with a vocoder) in TensorBoard (rank 0)."""
        exp = getattr(self.logger, "experiment", None)
        if self.global_rank != 0 or not (hasattr(exp, "add_audio") and hasattr(exp, "add_image")):
            return
        step, sr = self.global_step, self.flow_config.sample_rate
        exp.add_image(f"val/{uid}/mel_target", mel_spectrogram_image(target), step, dataformats="CHW")
        exp.add_image(f"val/{uid}/mel_generated", mel_spectrogram_image(gen), step, dataformats="CHW")
        if wav is not None:
            exp.add_audio(f"val/{uid}/generated", wav.clamp(-1, 1)[None], step, sr)
            exp.add_audio(f"val/{uid}/real", real.float().cpu()[None], step, sr)

    # ------------------------------------------------------------------ handoff
    def export(self, out_dir: str | Path) -> Path:
        """Write the handoff folder (kind "flow_decoder"): weights, flow config, the tokens and mel it was trained on,
        and the mel vocoder (``mel_vocoder`` subfolder) when one was given. Sharded, every rank calls this."""
        state = {k.removeprefix("flow."): v for k, v in full_state_dict(self.model).items()}
        if self.global_rank != 0:
            return Path(out_dir)
        m, h = self.units_meta, self.hparams
        units = {"units_fingerprint": m["fingerprint"], "units_kind": m["kind"],
                 "units_from": str(Path(h.units_from).resolve())}
        files = {"mel_vocoder": copy_vocoder(h.mel_vocoder)} if h.mel_vocoder else {}
        return write_export(out_dir, kind=EXPORT_KIND, config=config_dict(self.flow_config), state_dict=state,
                            extra=flow_export_meta(self.flow_config, self._mel_settings(), units), files=files)
