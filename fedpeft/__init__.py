"""fedpeft: federated parameter-efficient fine-tuning for hospitals."""

from pkgutil import extend_path

# In a checkout, this folder holds only the operator modules: fedpeft.common, .server and
# .client live in common/, server/ and client/ (pyproject's package-dir), which the editable
# install links under build/. When the checkout's root is on sys.path (``python -m fedpeft``
# run there, a Ray worker started there), Python finds this folder first; extending the path
# with the installed tree keeps the subpackages importable. An installed wheel has one tree.
__path__ = extend_path(__path__, __name__)

__version__ = "0.1.0"
