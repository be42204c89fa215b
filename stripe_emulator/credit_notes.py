"""Credit notes on finalized invoices.

``POST /v1/credit_notes``, ``GET /v1/credit_notes/preview`` (the same computation, nothing
stored), ``GET /v1/credit_notes`` (``invoice``, ``customer``), ``GET /v1/credit_notes/{id}``,
and ``GET /v1/invoices/{id}/lines`` to find the line to credit.

- ``invoice`` is required, and the invoice must be ``open`` or ``paid`` (CN-2, CN-4).
- ``lines[]`` of ``type=invoice_line_item`` name one of the invoice's lines and credit either
  a ``quantity`` of it (times the line's unit price, rounded half up as a line is) or an
  ``amount``; once a line was credited one way, later credit notes must credit it the same
  way (CN-5, CN-6). Crediting more of a line than it holds is refused ([inferred]).
  ``custom_line_item`` lines, ``amount`` alone and ``shipping_cost`` are not emulated.
- The credit notes of an invoice never sum past its total (CN-3).
- A credit note first reduces what the invoice has still to be paid (``pre_payment_amount``);
  the rest (``post_payment_amount``) must equal the sum of ``credit_amount`` (to the
  customer's balance), ``out_of_band_amount`` and refunds (CN-1; ``refund_amount`` is not
  emulated). ``type`` is ``pre_payment``, ``post_payment`` or ``mixed`` (CN-9). A preview
  answers the amounts without that check, so a caller can read ``post_payment_amount``
  before allocating it ([inferred]: the docs do not say which checks a preview makes).
- ``reason`` is one of ``duplicate``, ``fraudulent``, ``order_change``,
  ``product_unsatisfactory`` (CN-7). ``credit_note.created`` is sent.

The CN-* rules are in ``docs/reference/stripe-corrections.md``, with their sources.
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

from stripe_emulator.errors import EmulatedError, Json, invalid, missing, no_such
from stripe_emulator.params import (
    LIST_FIELDS,
    ApiRequest,
    int_param,
    list_page,
    metadata_param,
    only_keys,
    only_params,
    str_param,
)
from stripe_emulator.state import EmulatorState

_FIELDS = frozenset(
    {
        "invoice",
        "lines",
        "memo",
        "metadata",
        "reason",
        "credit_amount",
        "out_of_band_amount",
        "refund_amount",
        "email_type",
        "effective_at",
    }
)
_REASONS = frozenset({"duplicate", "fraudulent", "order_change", "product_unsatisfactory"})


class CreditNotesMixin(EmulatorState):
    """Credit notes: what they take off a finalized invoice, and where the money goes."""

    def create_credit_note(self, request: ApiRequest) -> Json:
        note = self._credit_note(request.params)
        invoice = self.invoices[note["invoice"]]
        for line in note["lines"]["data"]:
            credited = self._credited_lines.setdefault(line["invoice_line_item"], [None, 0, 0])
            credited[0] = "quantity" if line["quantity"] is not None else "amount"
            credited[1] += line["quantity"] or 0
            credited[2] += line["amount"]
        invoice["pre_payment_credit_notes_amount"] += note["pre_payment_amount"]
        invoice["post_payment_credit_notes_amount"] += note["post_payment_amount"]
        invoice["amount_remaining"] = int(invoice["amount_remaining"]) - note["pre_payment_amount"]
        invoice["amount_due"] = int(invoice["amount_due"]) - note["pre_payment_amount"]
        if note["pre_payment_amount"] and invoice["amount_remaining"] <= 0:
            invoice["status"] = "paid"  # nothing left to pay
        customer = self.customers.get(note["customer"])
        credit = int(request.params.get("credit_amount") or 0)
        if customer is not None and credit:
            customer["balance"] = int(customer["balance"]) - credit  # negative: owed to them
        sequence = self._credit_note_sequence.get(invoice["id"], 0) + 1
        self._credit_note_sequence[invoice["id"]] = sequence
        note.update(id=self._new_id("cn", 24), number=f"{invoice['number']}-CN-{sequence:02d}")
        for line in note["lines"]["data"]:
            line["id"] = self._new_id("cnli", 24)
        self.credit_notes[note["id"]] = note
        self._emit("credit_note.created", note, request)
        return note

    def preview_credit_note(self, request: ApiRequest) -> Json:
        return self._credit_note(request.params, allocated=False)

    def retrieve_credit_note(self, request: ApiRequest) -> Json:
        note = self.credit_notes.get(request.args["id"])
        if note is None:
            raise no_such("credit note", request.args["id"], "id", status=404)
        return note

    def list_credit_notes(self, request: ApiRequest) -> Json:
        params = request.params
        only_params(params, LIST_FIELDS | {"invoice", "customer"})
        items = list(reversed(self.credit_notes.values()))
        for field in ("invoice", "customer"):
            wanted = str_param(params, field)
            if wanted:
                items = [n for n in items if n[field] == wanted]
        return list_page(items, params, "/v1/credit_notes")

    def list_invoice_lines(self, request: ApiRequest) -> Json:
        only_params(request.params, LIST_FIELDS)
        invoice = self._invoice(request.args["id"])
        if invoice["status"] == "draft":
            self._refresh_usage(invoice)
        url = f"/v1/invoices/{invoice['id']}/lines"
        return list_page(list(invoice["lines"]["data"]), request.params, url)

    # -- the computation shared by create and preview ------------------------------------------

    def _credit_note(self, params: Json, *, allocated: bool = True) -> Json:
        only_params(params, _FIELDS)
        invoice_id = str_param(params, "invoice", required=True)
        invoice = self.invoices.get(invoice_id)
        if invoice is None:
            raise no_such("invoice", invoice_id, "invoice")
        if invoice["status"] not in ("open", "paid"):
            raise invalid(
                "invoice",
                f"You can only issue a credit note for an open or paid invoice; {invoice_id} "
                f"is {invoice['status']}.",
            )
        raw_lines = params.get("lines")
        if not raw_lines:
            raise missing("lines")  # `amount` and `shipping_cost` alone are not emulated
        if not isinstance(raw_lines, list):
            raise invalid("lines", "Invalid array: lines must be an array of objects.")
        by_id = {line["id"]: line for line in invoice["lines"]["data"]}
        lines = [self._note_line(raw, i, by_id) for i, raw in enumerate(raw_lines)]
        amount = sum(line["amount"] for line in lines)
        credited = int(invoice["pre_payment_credit_notes_amount"]) + int(
            invoice["post_payment_credit_notes_amount"]
        )
        if credited + amount > int(invoice["total"]):
            raise invalid(
                "lines",
                f"The sum of all credit notes ({credited + amount}) cannot exceed the invoice "
                f"total ({invoice['total']}).",
            )
        pre = min(amount, max(0, int(invoice["amount_remaining"])))
        post = amount - pre
        if int_param(params, "refund_amount"):
            raise invalid("refund_amount", "Refunds are not emulated: credit the balance instead.")
        credit = int_param(params, "credit_amount") or 0
        out_of_band = int_param(params, "out_of_band_amount") or 0
        if credit < 0 or out_of_band < 0:
            raise invalid("credit_amount", "Amounts must be positive integers.")
        if allocated and credit + out_of_band != post:
            raise invalid(
                "credit_amount",
                "The sum of refunds, customer balance credits, and outside of Stripe credits "
                f"must equal the post_payment_amount ({post}).",
            )
        reason = str_param(params, "reason") or None
        if reason is not None and reason not in _REASONS:
            raise invalid("reason", f"Invalid reason: must be one of {', '.join(sorted(_REASONS))}")
        kind = "pre_payment" if not post else "post_payment" if not pre else "mixed"
        return {
            "id": "",
            "object": "credit_note",
            "amount": amount,
            "amount_shipping": 0,
            "created": int(self.now()),
            "currency": invoice["currency"],
            "customer": invoice["customer"],
            "customer_balance_transaction": None,
            "discount_amount": 0,
            "discount_amounts": [],
            "effective_at": int(self.now()),
            "invoice": invoice_id,
            "lines": {"object": "list", "data": lines, "has_more": False, "url": ""},
            "livemode": False,
            "memo": str_param(params, "memo") or None,
            "metadata": metadata_param(params) or {},
            "number": "",
            "out_of_band_amount": out_of_band or None,
            "pdf": "",
            "post_payment_amount": post,
            "pre_payment_amount": pre,
            "pretax_credit_amounts": [],
            "reason": reason,
            "refunds": [],
            "shipping_cost": None,
            "status": "issued",
            "subtotal": amount,
            "subtotal_excluding_tax": amount,
            "total": amount,
            "total_excluding_tax": amount,
            "total_taxes": [],
            "type": kind,
            "voided_at": None,
        }

    def _note_line(self, raw: object, index: int, by_id: dict[str, Json]) -> Json:
        prefix = f"lines[{index}]"
        if not isinstance(raw, dict):
            raise invalid(prefix, f"Invalid object: {prefix} must be an object.")
        only_keys(
            raw,
            frozenset({"type", "invoice_line_item", "quantity", "amount", "description",
                       "metadata", "tax_amounts", "tax_rates"}),
            prefix,
        )  # fmt: skip
        kind = str_param(raw, "type", required=True)
        if kind != "invoice_line_item":
            raise invalid(f"{prefix}[type]", "Only lines of type invoice_line_item are emulated.")
        line_id = str_param(raw, "invoice_line_item")
        if not line_id:
            raise missing(f"{prefix}[invoice_line_item]")
        line = by_id.get(line_id)
        if line is None:
            raise no_such("invoice line item", line_id, f"{prefix}[invoice_line_item]")
        quantity = int_param(raw, "quantity")
        amount = int_param(raw, "amount")
        if (quantity is None) == (amount is None):
            raise invalid(prefix, f"Specify one of {prefix}[quantity] or {prefix}[amount].")
        way, quantity_so_far, amount_so_far = self._credited_lines.get(line_id, [None, 0, 0])
        if way is not None and way != ("quantity" if quantity is not None else "amount"):
            raise EmulatedError(
                400,
                "You can't combine discount types on an invoice line item: it was credited by "
                f"{way} before.",
                param=prefix,
            )
        unit = Decimal(line["pricing"]["unit_amount_decimal"])
        if quantity is not None:
            if quantity <= 0 or quantity_so_far + quantity > int(line["quantity"]):
                raise invalid(
                    f"{prefix}[quantity]",
                    f"The quantity to credit must be between 1 and what is left of the line "
                    f"({int(line['quantity']) - quantity_so_far}).",
                )
            amount = int((unit * quantity).quantize(Decimal(1), rounding=ROUND_HALF_UP))
        assert amount is not None
        if amount <= 0 or amount_so_far + amount > int(line["amount"]):
            raise invalid(
                f"{prefix}[amount]",
                f"The amount to credit must be between 1 and what is left of the line "
                f"({int(line['amount']) - amount_so_far}).",
            )
        return {
            "id": "",
            "object": "credit_note_line_item",
            "amount": amount,
            "description": line["description"],
            "discount_amount": 0,
            "discount_amounts": [],
            "invoice_line_item": line_id,
            "livemode": False,
            "metadata": {},
            "pretax_credit_amounts": [],
            "quantity": quantity,
            "tax_rates": [],
            "taxes": [],
            "type": "invoice_line_item",
            "unit_amount": None,
            "unit_amount_decimal": str(unit),
        }
