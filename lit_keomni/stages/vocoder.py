"""Stage 7 — unit HiFi-GAN vocoder (KE-Omni §4.3, §5.1; HiFi-GAN, Kong et al. 2020; unit input as Polyak et al. 2021).

    python -m lit_keomni fit --config recipes/stage7.yaml

Learns to turn one agent speaker's discrete units (the unit source's 12.5 Hz codes) into that speaker's waveform; KE-Omni
trains one such vocoder per agent speaker and keeps it frozen behind the unit generator. GAN training with Lightning's
manual optimisation, per batch a discriminator step (multi-period + multi-scale, least-squares loss) then a generator
step (adversarial + 2 × feature matching + 45 × log-mel L1). Two AdamW optimisers, lr 2e-4, β = (0.8, 0.99), learning
rates × ``lr_decay`` after every epoch. ``trainer.global_step`` counts optimiser steps: two per batch.
Validation: log-mel L1 of whole held-out utterances (``val/mel_l1``; the sanity check reports it at the start), and
audio and mel images in TensorBoard. Inputs: the unit source (``units_from``) and ``datamodules.vocoder`` pairs.
Output: ``checkpoints/stage7/export`` (kind "vocoder", read by ``checkpoints.load_vocoder``).
The generator is HiFi-GAN's (configs "tiny", "v1") or, with config "vocos-tiny" (``recipes/stage7_unit_vocos.yaml``),
a Vocos one at the STFT frame rate (``nn.vocos.UnitVocos``); both take the same units and speak the same export.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_keomni.checkpoints import unit_meta, write_export
from lit_keomni.configs import config_dict
from lit_keomni.distributed import apply_compile
from lit_keomni.nn.hifigan import (
    MultiPeriodDiscriminator,
    MultiScaleDiscriminator,
    UnitInput,
    VocoderConfig,
    VocoderMel,
    discriminator_loss,
    feature_loss,
    generator_loss,
)
from lit_keomni.nn.vocos import unit_vocoder_class
from lit_keomni.training import Stage, add_mel_l1, log_audio_samples, log_val_mel_l1

EXPORT_KIND = "vocoder"


class Vocoder(Stage):
    """Unit HiFi-GAN for one agent speaker; exports the handoff folder that ``chat`` speaks with."""

    def __init__(
        self,
        config: str = "tiny",
        overrides: dict[str, Any] | None = None,
        units_from: str = "checkpoints/stage1/export",
        speaker: str | None = None,
        lr: float = 2e-4,
        betas: tuple[float, float] = (0.8, 0.99),
        weight_decay: float = 0.01,
        lr_decay: float = 0.999,
        mel_weight: float = 45.0,
        val_log_samples: int = 2,
        export_dir: str | None = "checkpoints/stage7/export",
        compile: bool = False,
    ) -> None:
        """
        Args:
            config: ``VocoderConfig`` preset ("tiny" for CPU, "v1" = HiFi-GAN V1, "vocos-tiny" = the same unit
                embedding into a Vocos generator, ``nn.vocos.UnitVocos``); sample and unit rates come from the unit
                source.
            overrides: Field overrides of the preset, e.g. ``{upsample_initial_channel: 256}``.
            units_from: Unit source (stage-1 export or ``units`` export): number of units, unit rate, sample rate.
            speaker: Agent speaker this vocoder speaks as; None = the datamodule's ``speaker`` (they must agree).
            lr: Learning rate of both optimisers (HiFi-GAN: 2e-4).
            betas: AdamW betas (HiFi-GAN: 0.8, 0.99).
            weight_decay: AdamW weight decay (HiFi-GAN: 0.01, torch's default).
            lr_decay: Both learning rates are multiplied by this after every epoch (HiFi-GAN: 0.999).
            mel_weight: Weight of the log-mel L1 in the generator loss (HiFi-GAN: 45).
            val_log_samples: Validation utterances logged as audio and mel images to TensorBoard.
            export_dir: Where the ``Export`` callback writes the handoff folder at the end of fit.
            compile: ``torch.compile`` the generator and the two discriminators (``apply_compile``). The vocoder is
                not sharded (V1 has 14 M parameters); the paper recipe trains it on one GPU.
        """
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        if config not in VocoderConfig.presets:
            raise ValueError(f"model.config: unknown VocoderConfig preset {config!r}; known: {sorted(VocoderConfig.presets)}")
        self.vocoder_config: VocoderConfig | None = None  # built in configure_model, at the unit source's rates
        self.speaker = speaker
        self.generator: UnitInput | None = None
        self.units_meta: dict[str, Any] = {}
        self.init_mel_l1: float | None = None
        self._val = [0.0, 0.0]

    # ------------------------------------------------------------------ model
    def configure_model(self) -> None:
        if self.generator is not None:
            return
        self.units_meta = unit_meta(self.hparams.units_from)
        self.vocoder_config = VocoderConfig.from_name(
            self.hparams.config, **{**(self.hparams.overrides or {}), "sample_rate": self.units_meta["sample_rate"],
                                    "frame_rate": self.units_meta["frame_rate"]})
        self.generator = unit_vocoder_class(self.vocoder_config)(self.units_meta["num_units"], self.vocoder_config)
        self.mpd = MultiPeriodDiscriminator(self.vocoder_config)
        self.msd = MultiScaleDiscriminator(self.vocoder_config)
        self.mel = VocoderMel(self.vocoder_config.sample_rate)
        if self.hparams.compile:
            apply_compile([self.generator, self.mpd, self.msd])

    def setup(self, stage: str) -> None:
        data_speaker = getattr(getattr(self.trainer, "datamodule", None), "speaker", None)
        if self.speaker is None:
            self.speaker = data_speaker
        elif data_speaker is not None and data_speaker != self.speaker:
            raise ValueError(f"model.speaker is {self.speaker!r} but data.speaker is {data_speaker!r}; a vocoder "
                             f"learns one speaker: set them equal (or leave model.speaker null)")

    def forward(self, units: Tensor) -> Tensor:
        return self.generator(units)

    # ------------------------------------------------------------------ steps
    def configure_optimizers(self) -> Any:
        h = self.hparams
        opt_g = torch.optim.AdamW(self.generator.parameters(), lr=h.lr, betas=tuple(h.betas), weight_decay=h.weight_decay)
        opt_d = torch.optim.AdamW(itertools.chain(self.mpd.parameters(), self.msd.parameters()), lr=h.lr,
                                  betas=tuple(h.betas), weight_decay=h.weight_decay)
        scheds = [torch.optim.lr_scheduler.ExponentialLR(o, gamma=h.lr_decay) for o in (opt_g, opt_d)]
        return [opt_g, opt_d], scheds

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        norms = [p.grad.detach().float().norm() for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if norms:
            opt_g = self.optimizers()[0]
            which = "g" if optimizer is opt_g or optimizer is opt_g.optimizer else "d"
            self.log(f"train/grad_norm_{which}", torch.stack(norms).norm())

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Tensor]:
        opt_g, opt_d = self.optimizers()
        units, wav = batch["units"], batch["audio"]
        real = wav[:, None]
        fake = self.generator(units)

        # discriminator step: real -> 1, generated -> 0
        self.toggle_optimizer(opt_d)
        loss_d = sum(discriminator_loss(*d(real, fake.detach()[:, None])[:2]) for d in (self.mpd, self.msd))
        opt_d.zero_grad(set_to_none=True)
        self.manual_backward(loss_d)
        opt_d.step()
        self.untoggle_optimizer(opt_d)

        # generator step: fool the (updated) discriminators, match their features and the log-mel spectrogram
        self.toggle_optimizer(opt_g)
        mel_l1 = F.l1_loss(self.mel(fake), self.mel(wav))
        adv = fm = 0.0
        for d in (self.mpd, self.msd):
            _, scores, real_maps, fake_maps = d(real, fake[:, None])
            adv = adv + generator_loss(scores)
            fm = fm + feature_loss(real_maps, fake_maps)
        loss_g = adv + fm + self.hparams.mel_weight * mel_l1
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(loss_g)
        opt_g.step()
        self.untoggle_optimizer(opt_g)

        b = units.shape[0]
        self.log("train/loss_g", loss_g, prog_bar=True, batch_size=b)
        self.log("train/loss_d", loss_d, prog_bar=True, batch_size=b)
        self.log("train/mel_l1", mel_l1, prog_bar=True, batch_size=b)
        self.log("train/adv", adv, batch_size=b)
        self.log("train/feature_matching", fm, batch_size=b)
        self.log("train/lr", opt_g.param_groups[0]["lr"], batch_size=b)
        return {"loss": loss_g.detach(), "loss_d": loss_d.detach(), "mel_l1": mel_l1.detach()}

    def on_train_epoch_end(self) -> None:
        for sched in self.lr_schedulers():
            sched.step()

    # ------------------------------------------------------------------ validation
    def on_validation_epoch_start(self) -> None:
        self._val = [0.0, 0.0]

    @torch.no_grad()
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        units, wav, lengths = batch["units"], batch["audio"], batch["audio_lengths"]
        fake = self.generator(units)
        mel_fake, mel_real = self.mel(fake), self.mel(wav)
        frames = lengths // self.mel.hop_length
        add_mel_l1(self._val, mel_fake, mel_real, frames)
        if batch_idx == 0:
            log_audio_samples(self, batch["id"], wav, fake, mel_real, mel_fake, lengths, frames,
                              self.vocoder_config.sample_rate, self.hparams.val_log_samples)

    def on_validation_epoch_end(self) -> None:
        log_val_mel_l1(self, self._val)

    # ------------------------------------------------------------------ handoff
    def export(self, out_dir: str | Path) -> Path:
        """Write the generator's handoff folder (kind "vocoder"): weights, its config, units and speaker."""
        if self.global_rank != 0:
            return Path(out_dir)
        m = self.units_meta
        return write_export(
            out_dir,
            kind=EXPORT_KIND,
            config=config_dict(self.vocoder_config),
            state_dict=self.generator.state_dict(),
            extra={"num_units": m["num_units"], "frame_rate": m["frame_rate"], "sample_rate": m["sample_rate"],
                   "hop": self.generator.hop, "speaker": self.speaker, "units_fingerprint": m["fingerprint"],
                   "units_kind": m["kind"], "units_from": str(Path(self.hparams.units_from).resolve())},
        )
