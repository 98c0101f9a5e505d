"""Griffe extension for the API reference: a name that a module exports in ``__all__`` but imports lazily, in its
module ``__getattr__`` (``histcode.api.BagDataset``, so that ``import histcode.api`` does not import torch), is
invisible to static analysis; it is documented as what it is, the class or function of that name in one of the
package's own submodules."""

import griffe


class LazyExports(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, **kwargs) -> None:
        for module in [pkg, *_submodules(pkg)]:
            if "__getattr__" not in module.members or not module.exports:
                continue
            for name in module.exports:
                if not isinstance(name, str) or name in module.members:
                    continue  # an expression (``*PUBLIC``), or a name griffe sees
                found = [sub.members[name] for sub in _submodules(module)
                         if name in sub.members and not sub.members[name].is_alias]
                if len(found) == 1:  # defined once below the module: that is what __getattr__ hands out
                    module.set_member(name, griffe.Alias(name, found[0], parent=module))


def _submodules(module: griffe.Module):
    for sub in module.modules.values():
        yield sub
        yield from _submodules(sub)
