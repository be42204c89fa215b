-- Placeholder: this number is reserved for a migration of a parallel branch (issues 16 and
-- 18); delete this file when that branch's migration lands.
SELECT 1;
