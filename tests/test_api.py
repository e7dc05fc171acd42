"""The Python API: every command is a plain function of the package, the same objects the CLI uses."""

import mta_cli
from mta_cli import cache, evaluation
from mta_cli.extract import extract as extract_function
from mta_cli.train import trainer


def test_the_package_exports_the_library_functions():
    assert mta_cli.extract is extract_function
    assert mta_cli.train is trainer.train and mta_cli.TrainConfig is trainer.TrainConfig
    assert mta_cli.evaluate is evaluation.evaluate and mta_cli.CacheReader is cache.CacheReader
    assert set(mta_cli.__all__) <= set(dir(mta_cli))
