"""robustbench.json: RobustBench's model_info fields from an evaluation report (the layout
of RobustBench's `model_info/cifar10/Linf/Wang2023Better_WRN-28-10.json`), and what it
says RobustBench would want changed."""
from jaxdefense.evaluation import robustbench_record
from jaxdefense.config.defaults import get as default_config
from tests.helpers import load_config

MODEL_INFO_FIELDS = {"link", "name", "authors", "additional_data", "number_forward_passes",
                     "dataset", "venue", "architecture", "eps", "clean_acc", "reported",
                     "autoattack_acc", "footnote", "unreliable"}


def _report(accuracy=0.6731, natural=0.9244, points=10_000, data="cifar10", eps=8 / 255,
            norm="linf", version="standard", options=None):
  options = options or robustbench_record.standard_options(norm)
  return {"checkpoint": "best", "step": 39200, "dtype": "float32", "data": data, "eps": eps,
          "norm": norm, "results": {
              "natural": {"accuracy": natural, "num_points": points},
              "autoattack": {"accuracy": accuracy, "num_points": points, "version": version,
                             "options": options},
              "worst_case": {"accuracy": accuracy}}}


def test_a_standard_autoattack_run_is_a_model_info_record():
  config = load_config("generated", "wang2023,wrn28_10")
  record = robustbench_record.record(_report(), config)
  assert MODEL_INFO_FIELDS <= set(record)
  assert (record["clean_acc"], record["autoattack_acc"], record["eps"]) == ("92.44", "67.31",
                                                                            "8/255")
  assert record["architecture"] == "WideResNet-28-10" and record["dataset"] == "cifar10"
  assert record["threat_model"] == "Linf" and record["number_forward_passes"] == 1
  assert record["additional_data"] is False and "generated images, 70%" in record["footnote"]
  assert record["checks"] == []


def test_what_robustbench_would_want_changed_is_listed():
  config = load_config("quickstart", "cas")
  options = robustbench_record.standard_options("linf")
  options["square"]["queries"] = 100
  record = robustbench_record.record(
      _report(points=120, data="digits", eps=32 / 255, version="rand", options=options), config)
  assert record["eps"] == "32/255" and record["architecture"] == "resnet + CAS"
  checks = " ".join(record["checks"])
  for words in ("no leaderboard for 'digits'", "the rand version", "'queries': 100"):
    assert words in checks, words
  cifar = robustbench_record.record(_report(points=1000, eps=0.5, norm="l2"), config)
  assert cifar["eps"] == "0.5" and cifar["threat_model"] == "L2"
  assert cifar["checks"] == ["AutoAttack ran on 1000 of the 10000 test points; RobustBench's "
                             "entries use all 10000 (--config.eval.num_examples=0)"]


def test_no_autoattack_no_record():
  report = _report()
  del report["results"]["autoattack"]
  assert robustbench_record.record(report, default_config()) is None
