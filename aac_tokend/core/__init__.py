"""The pure core: tokens and their claims, profile state, the refresh policy, outcomes,
conditions, reports, import checks and config parsing, as functions of their inputs and ``now``.

No I/O and no clock: it imports only ``errors``, the stdlib and urllib3's URL parser
(``ownership`` alone reads stored states through the store it is given). Every other
subpackage builds on it.
"""
