"""seqio task and mixture registrations shipped with t5xlike: the package `t5xlike.tasks`.

Import a module here (or name it in `MIXTURE_OR_TASK_MODULE`, e.g.
`'t5xlike.tasks.multitask'`) to register its tasks, the way T5X users register theirs.
The repository keeps this directory at its top; an install ships it inside the package
(setup.py), so `import tasks` is never the way in: under that name, from a source
checkout's root, this file stops with a one-line error naming the new path instead of
registering every task a second time under a second module name (seqio refuses that).
"""
if __name__ != "t5xlike.tasks":
  raise ImportError("the task modules are the package t5xlike.tasks: import "
                    "t5xlike.tasks.<module> (e.g. from t5xlike.tasks import embedded), "
                    f"not {__name__}.<module>", name=__name__)
