"""Stage 7 (GLM-4-Voice decoder) — mel vocoder: HiFT (seeds/003 §2.1 speech decoder; CosyVoice ``hifigan.py``; HiFTNet)
or Vocos (``nn.vocos``).

    python -m lit_keomni fit --config recipes/stage7_hift.yaml     # HiFT, as GLM-4-Voice
    python -m lit_keomni fit --config recipes/stage7_vocos.yaml    # Vocos: the STFT at the frame rate, cheaper

Learns 80-bin log-mel (``nn.hift.MelFrontEnd``, 22,050 Hz, hop 256) -> waveform, the last step of GLM-4-Voice's
speech decoder (speech tokens -> flow matching -> mel -> vocoder); ``config`` names a preset of either generator
("tiny" / "glm-4-voice-decoder" = HiFT, "vocos-tiny" / "vocos" = Vocos). GAN training with Lightning's manual optimisation,
per batch a discriminator step (multi-period + multi-resolution spectrogram discriminators, least-squares loss plus
the truncated pointwise relativistic loss) then a generator step: adversarial + ``fm_weight`` × feature matching +
``mel_weight`` × full-band log-mel L1 + ``tpr_weight`` × TPR + ``f0_weight`` × L1 of HiFT's F0 predictor against
``nn.hift.f0_track`` of the real audio (CosyVoice's weights 1, 2, 45, 1, 1; its F0 target is WORLD's harvest; Vocos
has no F0 predictor). Two
Adam optimisers at a constant learning rate, gradients clipped to norm ``grad_clip`` (CosyVoice: 2e-4, 5).
``trainer.global_step`` counts optimiser steps: two per batch.
Validation: the same log-mel L1 over whole held-out utterances (``val/mel_l1``; the sanity check reports it at the
start), audio and mel images in TensorBoard. Input: ``datamodules.mel_vocoder`` waveforms. Output:
``checkpoints/stage7_hift/export`` (kind "mel_vocoder", its config.json field ``generator`` naming the family; read by
``checkpoints.load_mel_vocoder``).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_keomni.checkpoints import write_export
from lit_keomni.configs import config_dict
from lit_keomni.nn.hifigan import MultiPeriodDiscriminator, discriminator_loss, feature_loss, generator_loss
from lit_keomni.nn.hift import (
    HiFTGenerator,
    MelFrontEnd,
    MultiResolutionSpecDiscriminator,
    f0_track,
    tpr_loss,
)
from lit_keomni.nn.vocos import VocosGenerator, mel_vocoder_classes, mel_vocoder_family
from lit_keomni.training import Stage, add_mel_l1, log_audio_samples, log_val_mel_l1

EXPORT_KIND = "mel_vocoder"
VAL_SEED = 0
"""Seed of the excitation's random phases and noise in validation: the same val/mel_l1 for the same weights."""


class MelVocoder(Stage):
    """HiFT or Vocos mel vocoder; exports the handoff folder the GLM-4-Voice decoder speaks with."""

    def __init__(
        self,
        config: str = "tiny",
        overrides: dict[str, Any] | None = None,
        lr: float = 2e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        grad_clip: float = 5.0,
        mel_weight: float = 45.0,
        fm_weight: float = 2.0,
        tpr_weight: float = 1.0,
        tpr_tau: float = 0.04,
        f0_weight: float = 1.0,
        val_log_samples: int = 2,
        export_dir: str | None = "checkpoints/stage7_hift/export",
    ) -> None:
        """
        Args:
            config: A ``HiFTConfig`` preset ("tiny" for CPU, "glm-4-voice-decoder" = the released sizes) or a
                ``VocosConfig`` one ("vocos-tiny" for CPU, "vocos" = the published size).
            overrides: Field overrides of the preset, e.g. ``{base_channels: 128}``.
            lr: Learning rate of both Adam optimisers, constant (CosyVoice: 2e-4).
            betas: Adam betas (CosyVoice: torch's defaults).
            grad_clip: Gradient norm clip of each step (CosyVoice: 5); 0 = none.
            mel_weight: Weight of the full-band log-mel L1 (CosyVoice: 45).
            fm_weight: Weight of feature matching, itself HiFi-GAN's 2 × L1 (CosyVoice: 2).
            tpr_weight: Weight of the truncated pointwise relativistic loss on both sides (CosyVoice: 1); 0 = off.
            tpr_tau: Its cap τ (CosyVoice: 0.04).
            f0_weight: Weight of HiFT's F0 predictor's L1 in Hz against ``f0_track`` of the real audio (CosyVoice: 1);
                unused by Vocos.
            val_log_samples: Validation utterances logged as audio and mel images to TensorBoard.
            export_dir: Where the ``Export`` callback writes the handoff folder at the end of fit.
        """
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.family = mel_vocoder_family(config)
        config_class, self.generator_class = mel_vocoder_classes(self.family)
        self.vocoder_config = config_class.from_name(config, **(overrides or {}))
        self.generator: HiFTGenerator | VocosGenerator | None = None
        # The excitation's random phases and noise are drawn from a generator seeded by (noise_seed, step), not from
        # torch's global one, whose draws (e.g. by each new loader iterator) differ between a run and its resumption.
        self.noise_seed = int(torch.initial_seed()) % 2**31
        self.init_mel_l1: float | None = None
        self._val = [0.0, 0.0]

    # ------------------------------------------------------------------ model
    def configure_model(self) -> None:
        if self.generator is not None:
            return
        c = self.vocoder_config
        self.generator = self.generator_class(c)
        self.mpd = MultiPeriodDiscriminator(c)  # reads mpd_periods / mpd_channels, as from a VocoderConfig
        self.mrd = MultiResolutionSpecDiscriminator(c)
        self.mel_in = MelFrontEnd.of(c)  # what the generator reads (0-8 kHz)
        self.mel_loss = MelFrontEnd.of(c, f_max=c.sampling_rate / 2)  # CosyVoice's loss mel: full band

    def forward(self, mel: Tensor) -> Tensor:
        return self.generator(mel)[0]

    # ------------------------------------------------------------------ steps
    def configure_optimizers(self) -> Any:
        h = self.hparams
        opt_g = torch.optim.Adam(self.generator.parameters(), lr=h.lr, betas=tuple(h.betas))
        opt_d = torch.optim.Adam(itertools.chain(self.mpd.parameters(), self.mrd.parameters()), lr=h.lr,
                                 betas=tuple(h.betas))
        return [opt_g, opt_d]

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        norms = [p.grad.detach().float().norm() for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if norms:
            opt_g = self.optimizers()[0]
            which = "g" if optimizer is opt_g or optimizer is opt_g.optimizer else "d"
            self.log(f"train/grad_norm_{which}", torch.stack(norms).norm())

    def _step(self, opt: Any, loss: Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if self.hparams.grad_clip > 0:
            self.clip_gradients(opt, gradient_clip_val=self.hparams.grad_clip, gradient_clip_algorithm="norm")
        opt.step()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Tensor]:
        h = self.hparams
        opt_g, opt_d = self.optimizers()
        wav = batch["audio"]
        real = wav[:, None]
        with torch.no_grad():
            mel = self.mel_in(wav)
        noise = torch.Generator(device=wav.device).manual_seed(self.noise_seed * 1_000_003 + self.global_step)
        fake, f0 = self.generator(mel, generator=noise)
        discs = (self.mpd, self.mrd)

        # discriminator step: real -> 1, generated -> 0 (+ TPR)
        self.toggle_optimizer(opt_d)
        loss_d = 0.0
        for d in discs:
            sr, sf, _, _ = d(real, fake.detach()[:, None])
            loss_d = loss_d + discriminator_loss(sr, sf) + (h.tpr_weight * tpr_loss(sr, sf, h.tpr_tau) if h.tpr_weight else 0.0)
        self._step(opt_d, loss_d)
        self.untoggle_optimizer(opt_d)

        # generator step: fool the (updated) discriminators, match their features, the log-mel and the F0 track
        self.toggle_optimizer(opt_g)
        mel_l1 = F.l1_loss(self.mel_loss(fake), self.mel_loss(wav))
        f0_l1 = 0.0
        if f0 is not None:  # HiFT's F0 predictor
            with torch.no_grad():
                f0_target = f0_track(wav, self.vocoder_config.sampling_rate, self.vocoder_config.hop)
            f0_l1 = F.l1_loss(f0, f0_target)
        adv = fm = tpr = 0.0
        for d in discs:
            sr, sf, real_maps, fake_maps = d(real, fake[:, None])
            adv = adv + generator_loss(sf)
            fm = fm + feature_loss(real_maps, fake_maps)
            if h.tpr_weight:
                tpr = tpr + tpr_loss(sf, [s.detach() for s in sr], h.tpr_tau)
        loss_g = adv + h.fm_weight * fm + h.mel_weight * mel_l1 + h.tpr_weight * tpr + h.f0_weight * f0_l1
        self._step(opt_g, loss_g)
        self.untoggle_optimizer(opt_g)

        b = wav.shape[0]
        for name, value in (("loss_g", loss_g), ("loss_d", loss_d), ("mel_l1", mel_l1)):
            self.log(f"train/{name}", value, prog_bar=True, batch_size=b)
        parts = {"adv": adv, "feature_matching": fm, "tpr": tpr, **({"f0_l1": f0_l1} if f0 is not None else {})}
        for name, value in parts.items():
            self.log(f"train/{name}", value, batch_size=b)
        self.log("train/lr", opt_g.param_groups[0]["lr"], batch_size=b)
        return {"loss": loss_g.detach(), "loss_d": loss_d.detach(), "mel_l1": mel_l1.detach()}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["noise_seed"] = self.noise_seed

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.noise_seed = int(checkpoint.get("noise_seed", self.noise_seed))

    # ------------------------------------------------------------------ validation
    def on_validation_epoch_start(self) -> None:
        self._val = [0.0, 0.0]

    @torch.no_grad()
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        wav, lengths = batch["audio"], batch["audio_lengths"]
        g = torch.Generator(device=wav.device).manual_seed(VAL_SEED + batch_idx)
        fake, _ = self.generator(self.mel_in(wav), generator=g)
        mel_fake, mel_real = self.mel_loss(fake), self.mel_loss(wav)
        frames = lengths.to(wav.device) // self.vocoder_config.hop
        add_mel_l1(self._val, mel_fake, mel_real, frames)
        if batch_idx == 0:
            log_audio_samples(self, batch["id"], wav, fake, mel_real, mel_fake, lengths, frames,
                              self.vocoder_config.sampling_rate, self.hparams.val_log_samples)

    def on_validation_epoch_end(self) -> None:
        log_val_mel_l1(self, self._val)

    # ------------------------------------------------------------------ handoff
    def export(self, out_dir: str | Path) -> Path:
        """Write the generator's handoff folder (kind "mel_vocoder"): weights, its config, its family and the mel it
        reads."""
        if self.global_rank != 0:
            return Path(out_dir)
        c = self.vocoder_config
        return write_export(out_dir, kind=EXPORT_KIND, config=config_dict(c), state_dict=self.generator.state_dict(),
                            extra={"generator": self.family, "sample_rate": c.sampling_rate, "n_mels": c.in_channels, "hop": c.hop,
                                   "mel": self.mel_in.settings()})
