"""The pages people use: home (what the model is), register, log in, log out, upload, a
result, and the history of one's own predictions."""

from __future__ import annotations

from flask import Blueprint, current_app, flash, redirect, render_template, request, url_for
from flask_login import current_user, login_required, login_user, logout_user

from . import accounts
from .forms import LoginForm, LogoutForm, RegisterForm, UploadForm
from .jobs import own_prediction, own_predictions, queue_upload
from .predictor import describe_files
from .upload import ACCEPTED_FORMATS, UnsupportedUpload

__all__ = ["pages", "safe_next"]

pages = Blueprint("pages", __name__)


@pages.app_context_processor
def _everywhere() -> dict:
    return {"logout_form": LogoutForm(), "model": current_app.extensions["lightning_streaming"].pool.state}


def safe_next(target: str | None, default: str) -> str:
    """Where to go after logging in: only a path on this site (never another host)."""
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return default


@pages.get("/")
def home():  # noqa: ANN201 - Flask responses
    return render_template("home.html", formats=ACCEPTED_FORMATS)


@pages.route("/register", methods=["GET", "POST"])
def register():  # noqa: ANN201
    form = RegisterForm()
    if form.validate_on_submit():
        try:
            user = accounts.register(form.username.data, form.password.data)
        except accounts.AccountError as error:
            getattr(form, error.field).errors.append(str(error))
        else:
            login_user(user)
            flash(f"Welcome, {user.username}. Your account is ready.", "info")
            return redirect(url_for("pages.upload"))
    return render_template("register.html", form=form, username_rule=accounts.USERNAME_RULE,
                           password_rule=accounts.PASSWORD_RULE), 400 if form.errors else 200  # fmt: skip


@pages.route("/login", methods=["GET", "POST"])
def login():  # noqa: ANN201
    form = LoginForm()
    status = 200
    if form.validate_on_submit():
        user = accounts.authenticate(form.username.data, form.password.data)
        if user is not None:
            login_user(user)
            return redirect(safe_next(request.args.get("next"), url_for("pages.upload")))
        form.password.errors.append("Wrong user name or password.")
        status = 401
    elif form.errors:
        status = 400
    return render_template("login.html", form=form), status


@pages.post("/logout")
@login_required
def logout():  # noqa: ANN201
    form = LogoutForm()
    if form.validate_on_submit():
        accounts.end_sessions(current_user._get_current_object())
        logout_user()
        flash("You have logged out.", "info")
    return redirect(url_for("pages.home"))


@pages.route("/upload", methods=["GET", "POST"])
@login_required
def upload():  # noqa: ANN201
    form = UploadForm()
    status = 200
    if form.validate_on_submit():
        spacing = float(form.pixel_size.data) if form.pixel_size.data is not None else None
        try:
            prediction = queue_upload(current_user._get_current_object(), form.file.data, spacing)
        except UnsupportedUpload as error:
            form.file.errors.append(str(error))
            status = 415
        else:
            return redirect(url_for("pages.result", prediction_id=prediction.id))
    elif form.errors:
        status = 400
    return render_template("upload.html", form=form, formats=ACCEPTED_FORMATS), status


@pages.get("/predictions/<prediction_id>")
@login_required
def result(prediction_id: str):  # noqa: ANN201
    prediction = own_prediction(current_user, prediction_id)
    probabilities = sorted((prediction.probabilities or {}).items(), key=lambda item: -item[1])
    return render_template("result.html", p=prediction, probabilities=probabilities,
                           heatmaps=((prediction.layers or {}).get("heatmaps") or {}),
                           downloads=describe_files(prediction.files or {}))  # fmt: skip


@pages.get("/history")
@login_required
def history():  # noqa: ANN201
    return render_template("history.html", predictions=own_predictions(current_user))
