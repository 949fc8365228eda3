import json

from django.db import connection, models


class Customer(models.Model):
    id = models.TextField(primary_key=True)
    charged_cents = models.BigIntegerField(default=0)


class Payment(models.Model):
    # No unique constraint on job_key on purpose: the idempotency key is what
    # keeps a job from charging twice, and a second charge would be a second row.
    job_key = models.TextField()
    customer = models.ForeignKey(Customer, on_delete=models.PROTECT)
    amount_cents = models.BigIntegerField()
    created_at = models.DateTimeField(auto_now_add=True)


class Claim(models.Model):
    """The row idem_begin() returns. Not a table (managed = False): read with
    Claim.begin(). `result` is a JSONField so that the jsonb arrives as a dict:
    Django's PostgreSQL backend reads jsonb as a str everywhere else (a plain
    cursor.execute("SELECT result FROM idem_begin(...)") gives '{"payment_id": 7}')."""

    key = models.TextField(primary_key=True)
    status = models.TextField()
    result = models.JSONField(null=True)

    class Meta:
        managed = False

    @classmethod
    def begin(cls, key: str, request: dict) -> "Claim":
        sql = "SELECT %s AS key, status, result FROM idem_begin(%s, %s::jsonb)"
        return cls.objects.raw(sql, [key, key, json.dumps(request)])[0]

    @staticmethod
    def finish(key: str, result: dict) -> None:
        with connection.cursor() as cursor:
            cursor.execute("SELECT idem_finish(%s, %s::jsonb)", [key, json.dumps(result)])
