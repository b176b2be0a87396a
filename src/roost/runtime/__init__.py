"""The host-side runtime: release format, store and activation (later the peer engine).

Everything under this package imports only the Python standard library and
runs on Python 3.9, because it is shipped to target hosts as one zipapp.
"""
