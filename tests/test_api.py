"""The Python API: every command is a plain function of the package, the same objects the CLI uses."""

import mta_cli
from mta_cli import cache, evaluation, report
from mta_cli.extraction import extract as extract_function
from mta_cli.training import trainer


def test_the_package_exports_the_library_functions():
    assert mta_cli.extract is extract_function
    assert mta_cli.train is trainer.train and mta_cli.TrainConfig is trainer.TrainConfig
    assert mta_cli.evaluate is evaluation.evaluate and mta_cli.CacheReader is cache.CacheReader
    assert mta_cli.write_report is report.write_report
    assert set(mta_cli.__all__) <= set(dir(mta_cli))
    assert all(getattr(mta_cli, name) is not None for name in mta_cli.__all__)


def test_importing_the_package_loads_no_torch_and_keeps_the_training_subpackage():
    import subprocess
    import sys

    code = ("import sys, mta_cli; assert 'torch' not in sys.modules; import mta_cli.training.trainer as t; "
            "from mta_cli import train; assert train is t.train; print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "ok", result.stderr
