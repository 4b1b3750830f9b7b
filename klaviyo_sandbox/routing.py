"""Maps (method, path) to an operation id, built from the spec's paths. Trailing slashes are stripped before
matching (Klaviyo answers both forms)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from klaviyo_sandbox.errors import ApiError

_PARAM = re.compile(r"\{([^}]+)\}")


@dataclass
class Router:
    """Static paths by dictionary lookup; parameterised paths by regex."""

    static: dict[str, dict[str, str]] = field(default_factory=dict)
    dynamic: list[tuple[re.Pattern[str], dict[str, str]]] = field(default_factory=list)

    def add(self, method: str, template: str, operation_id: str) -> None:
        """Register one operation."""
        if "{" not in template:
            self.static.setdefault(template, {})[method] = operation_id
            return
        pattern = re.compile("^" + _PARAM.sub(lambda m: f"(?P<{m.group(1)}>[^/]+)", template) + "$")
        for existing, methods in self.dynamic:
            if existing.pattern == pattern.pattern:
                methods[method] = operation_id
                return
        self.dynamic.append((pattern, {method: operation_id}))

    def match(self, method: str, path: str) -> tuple[str, dict[str, str]]:
        """(operation id, path parameters), or a 404/405 ``ApiError``."""
        if len(path) > 1 and path.endswith("/"):
            path = path[:-1]
        methods = self.static.get(path)
        params: dict[str, str] = {}
        if methods is None:
            for pattern, candidates in self.dynamic:
                m = pattern.match(path)
                if m:
                    methods, params = candidates, m.groupdict()
                    break
        if methods is None:
            raise ApiError(404, "not_found", f"No route for {path}.", pointer=None)
        op = methods.get(method)
        if op is None:
            raise ApiError(
                405,
                "method_not_allowed",
                f'Method "{method}" not allowed.',
                pointer=None,
                headers={"allow": ", ".join(sorted(methods))},
            )
        return op, params
