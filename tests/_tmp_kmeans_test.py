import torch
from lit_keomni.guards import NonFiniteGuard
from tests.test_reliability import PoisonAudio, _all_finite
from tests.test_stage1 import make

def test_kmeans(prepared, tmp_path):
    guard = NonFiniteGuard("skip")
    model, data, trainer = make(prepared, tmp_path, 6, [PoisonAudio({0}), guard], vq_start=0.5)
    trainer.fit(model, data)
    print("skipped", guard.skipped, "finite", _all_finite(model.state_dict()))
    assert _all_finite(model.state_dict())
