import sys; sys.path.insert(0, "/tmp")
from tests.test_flow_stage import pairs, one_thread  # noqa
import dbg_resume
def test_dbg(tmp_path, prepared, stage1_export, speech_tokens, pairs):
    dbg_resume.run(tmp_path, prepared, stage1_export, speech_tokens, pairs)
