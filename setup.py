"""Build script.  Package metadata lives in pyproject.toml.

setup.py exists for the compiled ops in csrc/ (group advantage, issue 3), which are built with
torch.utils.cpp_extension; until they land it only installs the pure-Python packages.
"""

from setuptools import setup

setup()
