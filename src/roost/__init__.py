"""roost: peer-to-peer deploys for server fleets.

``roost.runtime`` is what runs on target hosts (standard library only, Python
3.9+); everything else in this package is the controller side.
"""

__version__ = "0.1.0"
