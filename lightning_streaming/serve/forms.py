"""The pages' forms (Flask-WTF: each carries and checks a CSRF token)."""

from __future__ import annotations

from flask_wtf import FlaskForm
from flask_wtf.file import FileField, FileRequired
from wtforms import DecimalField, PasswordField, StringField
from wtforms.validators import DataRequired, EqualTo, Length, NumberRange, Optional

from .accounts import PASSWORD_MAX, PASSWORD_MIN

__all__ = ["LoginForm", "RegisterForm", "UploadForm", "LogoutForm"]


class LoginForm(FlaskForm):
    """User name and password."""

    username = StringField("User name", validators=[DataRequired(), Length(max=64)])
    password = PasswordField("Password", validators=[DataRequired(), Length(max=PASSWORD_MAX)])


class RegisterForm(FlaskForm):
    """A new account (the account rules themselves are checked by ``accounts.register``)."""

    username = StringField("User name", validators=[DataRequired(), Length(min=3, max=64)])
    password = PasswordField("Password", validators=[DataRequired(), Length(min=PASSWORD_MIN, max=PASSWORD_MAX)])
    confirm = PasswordField("Password again", validators=[DataRequired(), EqualTo("password", "The passwords differ.")])


class UploadForm(FlaskForm):
    """An image to predict, and its pixel size when the file records none."""

    file = FileField("Image", validators=[FileRequired("Choose an image file.")])
    pixel_size = DecimalField(
        "Pixel size (µm per pixel)", places=None, validators=[Optional(), NumberRange(min=0.01, max=1000)]
    )


class LogoutForm(FlaskForm):
    """Log-out is a POST, so it carries a CSRF token too."""
