"""The hot path's queries as SQL composed once, instead of by the ORM on every call.

Every chunk and every offset look-up reads the caller's token, reads the upload (again, under its
lock) and moves its offset. The ORM builds each statement's SQL anew on every call: about 0.25 ms of
CPU apiece on the benchmark machine against 0.08 ms for the whole statement sent as it stands, so a
tus HEAD spent more time composing SQL than doing anything else (bench/README.md, issue 6).

The statements here are composed from the models' metadata, once per model, fields and database
vendor, so they follow the tables, columns and quoting the ORM would use. Parameters are prepared
and results converted by the same field methods the ORM calls, and rows become instances through
`Model.from_db`, as a queryset's do. Only equality filters and plain UPDATEs: anything more belongs
to the ORM.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from django.db import connection, transaction
from django.db.models import Field, Model

M = TypeVar("M", bound=Model)


@functools.cache
def _fields(model: type[Model]) -> tuple[Field, ...]:
    return tuple(model._meta.concrete_fields)


@functools.cache
def _converters(model: type[Model], vendor: str) -> tuple[tuple[int, tuple[Callable, ...], Any], ...]:
    """Per column that needs one, what the ORM's compiler applies to its value (see
    `SQLCompiler.get_converters`). They depend on the backend, not the connection: the one argument
    that could differ (the connection) is passed at each call."""
    converters = []
    for index, field in enumerate(_fields(model)):
        column = field.get_col(model._meta.db_table)
        found = (*connection.ops.get_db_converters(column), *field.get_db_converters(connection))
        if found:
            converters.append((index, found, column))
    return tuple(converters)


def _field(model: type[Model], name: str) -> Field:
    return model._meta.pk if name == "pk" else model._meta.get_field(name)


def _columns(model: type[Model], alias: str) -> str:
    quote = connection.ops.quote_name
    return ", ".join(f"{alias}.{quote(field.column)}" for field in _fields(model))


@functools.cache
def _select_sql(model: type[Model], names: tuple[str, ...], related: str | None, vendor: str) -> str:
    quote = connection.ops.quote_name
    sql = f"SELECT {_columns(model, 'm')}"
    joins = ""
    if related is not None:
        link = model._meta.get_field(related)
        other = link.related_model
        sql += f", {_columns(other, 'r')}"
        joins = (
            f" INNER JOIN {quote(other._meta.db_table)} r"
            f" ON r.{quote(link.target_field.column)} = m.{quote(link.column)}"
        )
    where = " AND ".join(f"m.{quote(_field(model, name).column)} = %s" for name in names)
    return f"{sql} FROM {quote(model._meta.db_table)} m{joins} WHERE {where}"


@functools.cache
def _update_sql(model: type[Model], names: tuple[str, ...], where: tuple[str, ...], vendor: str) -> str:
    quote = connection.ops.quote_name
    assignments = ", ".join(f"{quote(_field(model, name).column)} = %s" for name in names)
    conditions = " AND ".join(f"{quote(_field(model, name).column)} = %s" for name in where)
    return f"UPDATE {quote(model._meta.db_table)} SET {assignments} WHERE {conditions}"


def _instance(model: type[M], values: Sequence[Any]) -> M:
    values = list(values)
    for index, converters, column in _converters(model, connection.vendor):
        for converter in converters:
            values[index] = converter(values[index], column, connection)
    return model.from_db(connection.alias, None, values)


def get(model: type[M], *, related: str | None = None, **equals: Any) -> M | None:
    """The row whose fields equal `equals` (at most one must), or None.

    `related` names a foreign key of `model` whose row is read in the same statement (an inner
    join, like `select_related` on a non-null key) and cached on the instance.
    """
    names = tuple(equals)
    params = [_field(model, name).get_db_prep_value(value, connection) for name, value in equals.items()]
    with connection.cursor() as cursor:
        cursor.execute(_select_sql(model, names, related, connection.vendor), params)
        row = cursor.fetchone()
    if row is None:
        return None
    count = len(_fields(model))
    instance = _instance(model, row[:count])
    if related is not None:
        link = model._meta.get_field(related)
        link.set_cached_value(instance, _instance(link.related_model, row[count:]))
    return instance


@dataclass(frozen=True)
class Column:
    """A function part's parameter that is a column of an earlier part of the same `together` read
    (its `part`-th, counting from 0), not a value: e.g. the user id of the token read with it."""

    part: int
    name: str


@dataclass(frozen=True)
class Part:
    """One row of a `together` read: `model`'s row whose fields equal `equals` (with its `related`
    row, as in `get`), or, with `function`, the row a flagged function returns (as in `flagged`)."""

    model: type[Model]
    equals: tuple[tuple[str, Any], ...] = ()
    related: str | None = None
    function: str | None = None
    params: tuple[Any, ...] = ()

    def shape(self) -> tuple:
        # Values are sent as parameters (%s); columns are part of the statement.
        arguments = tuple(param if isinstance(param, Column) else None for param in self.params)
        return self.model, tuple(name for name, _ in self.equals), self.related, self.function, arguments


@functools.cache
def _together_sql(shapes: tuple[tuple, ...], vendor: str) -> str:
    quote = connection.ops.quote_name
    columns, joins = [], []
    for index, (model, names, related, function, arguments) in enumerate(shapes):
        alias = f"p{index}"
        if function is not None:
            columns.append(f"{alias}.flag")
            columns += [f"({alias}.upload).{quote(field.column)}" for field in _fields(model)]
            sql_arguments = ", ".join(
                "%s" if column is None
                else f"p{column.part}.{quote(_field(shapes[column.part][0], column.name).column)}"
                for column in arguments
            )
            joins.append(f" LEFT JOIN LATERAL {quote(function)}({sql_arguments}) {alias} ON true")
            continue
        columns.append(_columns(model, alias))
        source = f"{quote(model._meta.db_table)} {alias}"
        if related is not None:
            link = model._meta.get_field(related)
            other = link.related_model
            columns.append(_columns(other, f"{alias}r"))
            source = (
                f"({source} INNER JOIN {quote(other._meta.db_table)} {alias}r"
                f" ON {alias}r.{quote(link.target_field.column)} = {alias}.{quote(link.column)})"
            )
        where = " AND ".join(f"{alias}.{quote(_field(model, name).column)} = %s" for name in names)
        joins.append(f" LEFT JOIN {source} ON {where}")
    # One row whatever matches: every part is joined to it, so a part that matches nothing is NULLs.
    return f"SELECT {', '.join(columns)} FROM (SELECT 1) one{''.join(joins)}"


def _instance_or_none(model: type[M], values: Sequence[Any]) -> M | None:
    # A row that is not there reads as all columns NULL; the primary key never is in a real one.
    return None if values[_fields(model).index(model._meta.pk)] is None else _instance(model, values)


def together(*parts: Part) -> list[Any]:
    """Several rows in one statement (one round trip): per part, its instance or None; for a
    function's part, `(flag, instance or None)`, the flag None if the function returned no row."""
    params: list[Any] = []
    for part in parts:
        if part.function is not None:
            params += [param for param in part.params if not isinstance(param, Column)]
        else:
            params += [_field(part.model, name).get_db_prep_value(value, connection) for name, value in part.equals]
    with connection.cursor() as cursor:
        cursor.execute(_together_sql(tuple(part.shape() for part in parts), connection.vendor), params)
        row = cursor.fetchone()
    results, at = [], 0
    for part in parts:
        if part.function is not None:
            flag, at = row[at], at + 1
        count = len(_fields(part.model))
        instance = _instance_or_none(part.model, row[at:at + count])
        at += count
        if part.related is not None:
            link = part.model._meta.get_field(part.related)
            other_count = len(_fields(link.related_model))
            if instance is not None:
                link.set_cached_value(instance, _instance(link.related_model, row[at:at + other_count]))
            at += other_count
        results.append((None if flag is None else bool(flag), instance) if part.function is not None else instance)
    return results


def flagged(model: type[M], function: str, *params: Any) -> tuple[bool, M | None] | None:
    """The one row of a database function returning `(flag boolean, upload <model's row type>)`:
    its flag and its row as an instance (None for a NULL row), or None when it returned no row.

    For the functions that take or look at a lock and then read, in one round trip (see
    migrations/0004). Parameters are passed as they are: bigints, uuids.
    """
    ((flag, instance),) = together(Part(model, function=function, params=params))
    return None if flag is None else (flag, instance)


def reload(instance: Model, fresh: Model | None = None) -> None:
    """`refresh_from_db()` for every concrete field, in one statement composed once; or, given
    `fresh` (the same row, just read by other means), without a statement."""
    model = type(instance)
    fresh = get(model, pk=instance.pk) if fresh is None else fresh
    if fresh is None:
        raise model.DoesNotExist(f"{model.__name__} {instance.pk} no longer exists.")
    for field in _fields(model):
        if field.is_relation and field.is_cached(instance) and getattr(fresh, field.attname) != getattr(
            instance, field.attname
        ):
            field.delete_cached_value(instance)  # as refresh_from_db does when the key changed
        setattr(instance, field.attname, getattr(fresh, field.attname))


def update(model: type[Model], *, where: dict[str, Any], values: dict[str, Any]) -> int:
    """`UPDATE ... SET values WHERE where` (equalities); the number of rows changed."""
    params = [_field(model, name).get_db_prep_save(value, connection) for name, value in values.items()]
    params += [_field(model, name).get_db_prep_value(value, connection) for name, value in where.items()]
    # As `QuerySet.update`: a failure inside an atomic block marks it for rollback.
    with transaction.mark_for_rollback_on_error(using=connection.alias), connection.cursor() as cursor:
        cursor.execute(_update_sql(model, tuple(values), tuple(where), connection.vendor), params)
        return cursor.rowcount
