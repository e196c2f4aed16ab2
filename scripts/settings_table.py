"""Print the README's configuration table from collab.settings.Settings (the single source)."""

from dataclasses import fields

from collab.settings import Settings


def table() -> str:
    rows = ["| flag | env | default | what it does |", "|---|---|---|---|"]
    for f in fields(Settings):
        default = "random" if f.name == "node_id" else ("unset" if f.default is None else f"`{f.default}`")
        rows.append(f"| `--{f.name.replace('_', '-')}` | `COLLAB_{f.name.upper()}` | {default} | {f.metadata.get('help', '')} |")
    return "\n".join(rows)




def write_readme(path: str = "README.md") -> None:
    """Replace the table between the settings markers in README.md."""
    text = open(path, encoding="utf-8").read()
    begin, end = "<!-- settings:begin -->", "<!-- settings:end -->"
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    open(path, "w", encoding="utf-8").write(f"{head}{begin}\n{table()}\n{end}{tail}")


if __name__ == "__main__":
    import sys

    if "--write" in sys.argv:
        write_readme()
    else:
        print(table())
