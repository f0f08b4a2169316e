"""Alembic migrations. A package only so that the wheel ships them (with alembic.ini and the
revision template as package data) next to `app/`, where `app.migrate` finds them."""
