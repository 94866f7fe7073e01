"""The root of errors a user can fix (bad params, bad files, failed data gates).

The CLI prints these as a clear message and exits non-zero, without a traceback; anything else
is a bug and keeps its traceback.
"""


class UserError(Exception):
    exit_code = 1
